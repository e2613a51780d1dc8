"""What training costs: model FLOPs per step, model FLOPs utilisation (MFU), and a run's energy and CO2e.

FLOPs are counted exactly from the config and the batch shape, as the matmuls the network performs: a
matmul of [m, k] by [k, n] is 2*m*n*k FLOPs (a multiply and an add per term), the convention of XLA's cost
analysis and of the MFU literature (PaLM, appendix B). Elementwise work (norms, softmax, GELU, residual
adds, the loss) and gathers (embedding lookups, relative position biases) count 0: together they are a few
percent of a step at T5 sizes, and hardware peaks are quoted for matmuls.

Training is 3x the forward pass: the backward pass multiplies by each matmul's two operands' transposes,
twice the forward's matmuls (every matmul here has a trainable input on both sides). Recomputation is not
counted (rematerialisation, and the attention backward pass's QK^T, see `layers.dot_product_attention`), so `mfu`
is model FLOPs utilisation, not hardware FLOPs utilisation.
"""
from __future__ import annotations

import glob
import os
import re
import time
from typing import Any

from t5x_lite import network


def _attention_flops(batch_size: int, query_length: int, key_length: int, config: network.T5Config) -> dict[str, int]:
    """One multi-head attention block: q/o projections on the queries, k/v projections on the keys, and the
    two batched matmuls QK^T [q, k] and weights x V, each 2*b*heads*q*k*head_dim."""
    joined = config.num_heads * config.head_dim
    projections = 2 * batch_size * config.emb_dim * joined * (2 * query_length + 2 * key_length)
    scores = 2 * (2 * batch_size * config.num_heads * query_length * key_length * config.head_dim)
    return {"attention_projections": projections, "attention_scores": scores}


def _mlp_flops(batch_size: int, length: int, config: network.T5Config) -> int:
    """The MLP: one [embed, mlp] kernel per activation (T5.1.1's gated wi_0 and wi_1, T5 1.0's wi), then wo
    [mlp, embed]."""
    kernels = len(config.mlp_activations) + 1
    return kernels * (2 * batch_size * length * config.emb_dim * config.mlp_dim)


def forward_flops(
    config: network.T5Config, batch_size: int, inputs_length: int, targets_length: int
) -> dict[str, int]:
    """Matmul FLOPs of one teacher-forced forward pass over an unpacked batch [batch, length].

    Returns a dict of Python ints with two breakdowns of the same `total`:
      by stack: `encoder` + `decoder` + `logits` == `total`;
      by kind:  `attention_projections` (q, k, v, o) + `attention_scores` (QK^T and weights x V) + `mlp`
                + `logits` == `total`.
    Packing does not change the count: the network attends over the whole packed row (masking, not skipping).
    """
    for name, value in (("batch_size", batch_size), ("inputs_length", inputs_length), ("targets_length", targets_length)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}={value!r}; valid: a positive integer")
    b, inputs, targets = int(batch_size), int(inputs_length), int(targets_length)

    encoder_attention = _attention_flops(b, inputs, inputs, config)
    decoder_self = _attention_flops(b, targets, targets, config)
    # Cross-attention: queries (and the output projection) on the targets, keys and values on the encoder's
    # outputs, scores [targets, inputs].
    decoder_cross = _attention_flops(b, targets, inputs, config)
    kinds_per_encoder_layer = {**encoder_attention, "mlp": _mlp_flops(b, inputs, config)}
    kinds_per_decoder_layer = {
        key: decoder_self[key] + decoder_cross[key] for key in ("attention_projections", "attention_scores")
    }
    kinds_per_decoder_layer["mlp"] = _mlp_flops(b, targets, config)

    kinds = {
        key: config.num_encoder_layers * kinds_per_encoder_layer[key]
        + config.num_decoder_layers * kinds_per_decoder_layer[key]
        for key in ("attention_projections", "attention_scores", "mlp")
    }
    # The output layer (a dense kernel, or the tied embedding via `attend`): [targets, embed] x [embed, vocab].
    logits = 2 * b * targets * config.emb_dim * config.vocab_size
    encoder = config.num_encoder_layers * sum(kinds_per_encoder_layer.values())
    decoder = config.num_decoder_layers * sum(kinds_per_decoder_layer.values())
    total = encoder + decoder + logits
    assert total == sum(kinds.values()) + logits
    return {"encoder": encoder, "decoder": decoder, "logits": logits, **kinds, "total": total}


def train_flops_per_step(
    config: network.T5Config, batch_size: int, inputs_length: int, targets_length: int
) -> int:
    """Model FLOPs of one training step on a batch [batch_size, length]: forward + backward = 3 x forward.

    Gradient accumulation does not change it (the microbatches add up to the batch); optimizer updates are
    elementwise and not counted.
    """
    return 3 * forward_flops(config, batch_size, inputs_length, targets_length)["total"]


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s of the devices that ran the step (the
    sum over all of them when the step is spread over several)."""
    if step_seconds <= 0:
        raise ValueError(f"step_seconds={step_seconds!r}; valid: > 0")
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak_flops_per_second={peak_flops_per_second!r}; valid: > 0")
    return flops_per_step / step_seconds / peak_flops_per_second


# ---- energy and emissions ------------------------------------------------------------------------------------
# Patterson et al. 2021, "Carbon Emissions and Large Neural Network Training": energy = device-hours x average
# power per device x PUE (the datacenter's power usage effectiveness: its total power over its computers'), and
# CO2e = energy x the grid's carbon intensity. The defaults are their GPT-3 row's datacenter (PUE 1.10) and grid
# (0.429 kgCO2e/kWh, the US average); their T5 row has 1.12 and 0.545. A laptop's PUE is 1.0.
DEFAULT_PUE = 1.10
DEFAULT_GRID_KG_CO2E_PER_KWH = 0.429
# Estimated average power per device, where nothing measures it: a datacenter GPU at load (an A100's or H100's
# board draws 300-700 W), a TPU chip (Patterson et al. measured 310 W per TPU v3 chip for T5), and one CPU core at
# load (a server package of 64 cores at 280 W is 4.4 W a core; a laptop's 8 cores at 45-65 W, 6-8 W).
ESTIMATED_WATTS_PER_DEVICE = {"gpu": 400.0, "tpu": 310.0, "cpu": 8.0}
_JOULES_PER_KWH = 3.6e6


def energy_kwh(device_seconds: float, watts_per_device: float, pue: float = DEFAULT_PUE) -> float:
    """Patterson et al.'s energy: device-seconds x average power per device x PUE, in kWh."""
    for name, value in (("device_seconds", device_seconds), ("watts_per_device", watts_per_device), ("pue", pue)):
        if not value >= 0:
            raise ValueError(f"{name}={value!r}; valid: a number >= 0")
    return device_seconds * watts_per_device * pue / _JOULES_PER_KWH


def co2e_kg(kwh: float, grid_kg_co2e_per_kwh: float = DEFAULT_GRID_KG_CO2E_PER_KWH) -> float:
    """CO2-equivalent emissions of `kwh` drawn from a grid of the given carbon intensity, in kg."""
    if not grid_kg_co2e_per_kwh >= 0:
        raise ValueError(f"grid_kg_co2e_per_kwh={grid_kg_co2e_per_kwh!r}; valid: a number >= 0")
    return kwh * grid_kg_co2e_per_kwh


def chip_days(total_flops: float, flops_per_second_per_chip: float) -> float:
    """The reverse question: how many chip-days `total_flops` take at a measured rate per chip (divide by the
    number of chips for the wall-clock days)."""
    if not flops_per_second_per_chip > 0:
        raise ValueError(f"flops_per_second_per_chip={flops_per_second_per_chip!r}; valid: > 0")
    return total_flops / flops_per_second_per_chip / 86400.0


def cpu_cores() -> int:
    """The CPU cores this process may run on: its devices when JAX runs on the CPU (however many devices XLA
    simulates on them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _RaplCounters:
    """The CPU packages' energy counters (Linux powercap, `<root>/intel-rapl:<n>/energy_uj`, AMD's too), read at
    each `sample()`; a counter that went down wrapped around at its `max_energy_range_uj`."""

    def __init__(self, root: str):
        self.zones = sorted(glob.glob(os.path.join(root, "intel-rapl:[0-9]*")))
        self.zones = [z for z in self.zones if re.fullmatch(r"intel-rapl:\d+", os.path.basename(z))]
        self.last = [self._read(z, "energy_uj") for z in self.zones]
        self.ranges = [self._read(z, "max_energy_range_uj") for z in self.zones]
        self.joules = 0.0

    @staticmethod
    def _read(zone: str, name: str) -> int:
        with open(os.path.join(zone, name)) as f:
            return int(f.read())

    def sample(self) -> None:
        for i, zone in enumerate(self.zones):
            now = self._read(zone, "energy_uj")
            delta = now - self.last[i] if now >= self.last[i] else now + self.ranges[i] - self.last[i]
            self.joules += delta / 1e6
            self.last[i] = now


def _rapl_counters(root: str) -> _RaplCounters | None:
    """The RAPL counters under `root` when there are some and this process may read them, else None."""
    try:
        counters = _RaplCounters(root)
    except (OSError, ValueError):  # unreadable (root-only on many kernels) or garbled
        return None
    return counters if counters.zones else None


class EnergyMeter:
    """The energy a run draws on this host: measured where the machine can tell, else estimated.

    Measured: the CPU packages' RAPL counters when JAX runs on the CPU and they are readable; NVIDIA's NVML
    (the `nvidia-ml-py` package, when installed) on a GPU. Otherwise estimated as `watts_per_device` (default:
    ESTIMATED_WATTS_PER_DEVICE for the platform) x the devices x the seconds; TPU chips report no power here.
    Call `sample()` now and then (counters wrap), and `summary()` at the end. On a CPU a device is a core.
    """

    def __init__(self, platform: str, num_devices: int, *, watts_per_device: float | None = None,
                 pue: float = DEFAULT_PUE, grid_kg_co2e_per_kwh: float = DEFAULT_GRID_KG_CO2E_PER_KWH,
                 rapl_root: str = "/sys/class/powercap"):
        self.platform, self.num_devices = platform, num_devices
        self.pue, self.grid = pue, grid_kg_co2e_per_kwh
        self.start = time.monotonic()
        self._rapl = _rapl_counters(rapl_root) if platform == "cpu" and watts_per_device is None else None
        self._nvml = _nvml_energy() if platform == "gpu" and watts_per_device is None else None
        if watts_per_device is None and platform not in ESTIMATED_WATTS_PER_DEVICE:
            raise ValueError(f"no estimated power for platform {platform!r}: give watts_per_device")
        self.watts_per_device = watts_per_device or ESTIMATED_WATTS_PER_DEVICE.get(platform)

    @property
    def source(self) -> str:
        if self._rapl is not None:
            return "measured: RAPL"
        if self._nvml is not None:
            return "measured: NVML"
        return f"estimated: {self.watts_per_device:g} W per device"

    def sample(self) -> None:
        for meter in (self._rapl, self._nvml):
            if meter is not None:
                meter.sample()

    def summary(self) -> dict[str, Any]:
        """device_seconds, energy_kwh (PUE included), co2e_kg, and where the power came from."""
        self.sample()
        seconds = time.monotonic() - self.start
        device_seconds = seconds * self.num_devices
        measured = self._rapl or self._nvml
        if measured is not None:
            kwh = measured.joules * self.pue / _JOULES_PER_KWH
        else:
            kwh = energy_kwh(device_seconds, self.watts_per_device, self.pue)
        return {"device_seconds": device_seconds, "energy_kwh": kwh, "co2e_kg": co2e_kg(kwh, self.grid),
                "power": self.source, "pue": self.pue, "grid_kg_co2e_per_kwh": self.grid}


class _NvmlEnergy:
    """The GPUs' total energy counters (millijoules since the driver loaded), through nvidia-ml-py."""

    def __init__(self, pynvml):
        self.pynvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.last = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        self.joules = 0.0

    def sample(self) -> None:
        for i, handle in enumerate(self.handles):
            now = self.pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.joules += (now - self.last[i]) / 1e3
            self.last[i] = now


def _nvml_energy() -> _NvmlEnergy | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        meter = _NvmlEnergy(pynvml)
    except Exception:  # no nvidia-ml-py, no driver, or a GPU without energy counters: estimate instead
        return None
    return meter if meter.handles else None
