"""Reason codes stored beside masked values ("refuse, don't flag").

A derived number whose conditions fail is stored as NaN with an int8 reason code beside it
(``temperature_reason``, ``fit_k_reason``, ...). Each table below is written into the code
variable's attrs (CF ``flag_values`` / ``flag_meanings`` plus a readable ``reasons`` text) by
``pipeline.store.zarr_io.annotate``, so a reader of the store needs no code to decode it. The
report and ``thermoscope check`` print the same sentences. Conditions: METHODS.md.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """An int code that carries its sentence: ``Member = code, "text"``; ``table()`` gives the
    {code: text} mapping written into the store and printed by the report and ``check``."""

    def __new__(cls, value: int, text: str):
        member = int.__new__(cls, value)
        member._value_ = value
        member.text = text
        return member

    @classmethod
    def table(cls) -> dict[int, str]:
        return {int(member): member.text for member in cls}


class TemperatureReason(Reason):
    """Why a (step, layer) cell of the local temperature has no value (0: it has one).

    One code per cell, by precedence: 1 (no window: nothing could give a value there) first;
    then 4 on every other cell when the run's optimizer relation is refused
    (``temperature_refusal`` non-empty), whatever the cell's own data would say, since the
    run-level refusal is what the user must act on (and what ``thermoscope check`` forecasts);
    otherwise the cell's own reason (6, 2, 7 from the window fit; 5 rounding; 3 no step size).
    """

    IDENTIFIED = 0, "identified"
    TOO_FEW_CHECKPOINTS = 1, "too few checkpoints for a window (needs min_window + 1)"
    SPACING_TOO_COARSE = (
        2,
        "checkpoint spacing longer than the layer's relaxation time (MSD saturates between lags)",
    )
    NO_LR_LOG = 3, "no step size (no learning-rate log): only the diffusivity D is reported"
    OPTIMIZER_STATE_MISSING = (
        4,
        "optimizer relation refused (the run's temperature_refusal says why)",
    )
    ROUNDING_LIMITED = (
        5,
        "rounding-limited: the layer moves less than half an ulp of its storage dtype per interval",
    )
    MISSING_VALUES = 6, "non-finite values or missing distances in the window"
    NO_DIFFUSION_SIGNAL = 7, "no resolvable diffusion (D <= 0 or error larger than the value)"


TEMPERATURE_REASONS = TemperatureReason.table()


class StateTemperatureReason(Reason):
    """Why a state temperature dE/dS (global, per layer, or across the data shift) is refused."""

    OK = 0, "computed"
    NO_ENERGY_CHANGE = (
        1,
        "no energy change measured (loss not logged, or no finite work or heat yet)",
    )
    NO_ENTROPY_CHANGE = 2, "no entropy change resolved (|dS| <= 1e-9 nats, or entropy not finite)"
    NOT_POSITIVE = 3, "dE/dS <= 0: energy and entropy did not move together, no thermal reading"


STATE_TEMPERATURE_REASONS = StateTemperatureReason.table()


class FitReason(Reason):
    """Why a cross-run quantity of the sweep (free-energy T, k fit, heat capacity) is refused."""

    OK = 0, "accepted"
    NOT_STATIONARY = 1, "plateau not stationary (loss, T or S drifts over the run's second half)"
    TOO_FEW_PLATEAUS = 2, "fewer than 2 stationary constant-LR plateaus"
    NO_TEMPERATURE = 3, "no identified temperature on the plateau"
    NOT_POSITIVE = 4, "estimate not positive (no F = U - T S minimum at a positive T / C <= 0)"
    K_OUT_OF_TOLERANCE = (
        5,
        "exponent k outside 1 +- the estimator's tolerance (T not proportional to lr)",
    )
    OTHER_OPTIMIZER = (
        6,
        "run of another optimizer than the sweep's fit group (never compared across optimizers)",
    )


FIT_REASONS = FitReason.table()


class EfficiencyReason(Reason):
    """Why a layer's heat-engine efficiency has no value."""

    OK = 0, "computed"
    NO_ACTIVATION = 1, "the tensor feeds no activation (attention, embedding, output projection)"
    ACTIVATION_UNKNOWN = 2, "activation unknown (no config.json rule for this tensor)"
    VECTOR = 3, "1-D tensor (bias or norm gain)"
    NO_TEMPERATURE = 4, "no identified temperature at this step"
    NO_PARTNER = 5, "no next layer in signal order with an identified temperature"
    NO_HEAT = 6, "no positive work or released heat over the run"


EFFICIENCY_REASONS = EfficiencyReason.table()

# code variable -> its table (annotate writes it into the variable's attrs)
REASON_TABLES: dict[str, dict[int, str]] = {
    "temperature_reason": TEMPERATURE_REASONS,
    "free_energy_temperature_reason": FIT_REASONS,
    "fit_k_reason": FIT_REASONS,
    "group_fit_k_reason": FIT_REASONS,
    "heat_capacity_reason": FIT_REASONS,
    "plateau_reason": FIT_REASONS,
    "state_temperature_reason": STATE_TEMPERATURE_REASONS,
    "layer_state_temperature_reason": STATE_TEMPERATURE_REASONS,
    "shift_state_temperature_reason": STATE_TEMPERATURE_REASONS,
    "work_efficiency_reason": EFFICIENCY_REASONS,
    "carnot_efficiency_reason": EFFICIENCY_REASONS,
    "realized_efficiency_reason": EFFICIENCY_REASONS,
}


def reason_attrs(table: dict[int, str]) -> dict:
    """CF-style attrs of a reason-code variable: flag_values, flag_meanings, reasons text."""
    meanings = " ".join(
        text.split(" (")[0].split(":")[0].replace(" ", "_") for text in table.values()
    )
    return {
        "flag_values": list(table),
        "flag_meanings": meanings,
        "reasons": "; ".join(f"{code}: {text}" for code, text in table.items()),
    }
