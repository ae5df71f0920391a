"""DVC stage `thermo`: see pipeline.stages.thermo."""

from pipeline.stages import thermo, run_stage

if __name__ == "__main__":
    run_stage(thermo)
