"""DVC stage `report`: see pipeline.stages.report."""

from pipeline.stages import report, run_stage

if __name__ == "__main__":
    run_stage(report)
