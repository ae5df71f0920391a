"""DVC stage `index`: see pipeline.stages.index."""

from pipeline.stages import index, run_stage

if __name__ == "__main__":
    run_stage(index)
