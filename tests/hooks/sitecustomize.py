"""Test-only: put this folder on PYTHONPATH of a modeltest process a test starts, and
MODELTEST_TEST_SLOW_SAMPLE_S=S makes it wait S seconds after saving each finished sample — so a
crash-recovery test can kill the run halfway. Nothing in modeltest reads that variable: this file
wraps the harness's RecordSaver.finish when modeltest.runner is first imported."""

import importlib.abc
import importlib.util
import os
import sys
import time

SLOW_S = float(os.environ.get("MODELTEST_TEST_SLOW_SAMPLE_S", "0") or 0)


class _SlowSamples(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "modeltest.runner":
            return None
        sys.meta_path.remove(self)  # find the real module; patch it once loaded
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            finish = module.RecordSaver.finish

            def slow_finish(self, *args, **kwargs):
                finish(self, *args, **kwargs)
                time.sleep(SLOW_S)

            module.RecordSaver.finish = slow_finish

        spec.loader.exec_module = exec_module
        return spec


if SLOW_S > 0:
    sys.meta_path.insert(0, _SlowSamples())
