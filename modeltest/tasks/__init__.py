"""Dataset tasks, one file each. `TASKS` maps a task_name to its class."""
from .textvqa import TextVQATask
from .videobench import VideoBenchTask

TASKS = {TextVQATask.name: TextVQATask, VideoBenchTask.name: VideoBenchTask}
