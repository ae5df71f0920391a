"""DVC stage `thermo`: see pipeline.stages.thermo."""

from pipeline.stages import run_stage, thermo

if __name__ == "__main__":
    run_stage(thermo)
