"""Dataset tasks, one module each (config dataclass, dataset reader, prompt, scoring).
`TASKS` maps a task_name to its class: the one place a task is registered."""

from .textvqa import TextVQATask
from .videobench import VideoBenchTask

TASKS = {TextVQATask.name: TextVQATask, VideoBenchTask.name: VideoBenchTask}
