"""DVC stage `measure`: see pipeline.stages.measure."""

from pipeline.stages import measure, run_stage

if __name__ == "__main__":
    run_stage(measure)
