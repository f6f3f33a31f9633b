"""gradscore score models to and from diffusers pipeline folders (docs/theory.md §1 and §7).

A diffusers pipeline's network predicts what its scheduler's ``prediction_type`` says: ``eps`` (``epsilon``),
``x0`` (``sample``) or ``v``; a score model gives them by ``eps = -sigma_t s``. Export: a ``ScoreModel`` with
``output="eps"`` or ``"x0"`` is its ``UNet2DModel`` unchanged, with the scheduler's ``prediction_type`` set to
match (an ordinary diffusers pipeline). An ``EnergyScore`` (``s = -grad_x E``) or a ``ScoreModel`` with
``output="score"`` is no eps predictor: its backbone alone in ``DDPMPipeline`` runs without error and samples
the wrong thing. It is exported as ``ScoreEpsUNet``, a diffusers model that computes ``eps = -sigma_t s(x, t)``
(the energy's input gradient included) and that the standard pipelines load from ``gradscore.pipelines``.
Import: ``load_pretrained(folder) -> (score_model, sde)`` turns a pipeline or UNet folder back into a score
model and its ``DiscreteVPSDE``, for the diagnostics.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from diffusers import ConfigMixin, DDPMPipeline, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from .parametrisation import ENERGIES, EnergyScore, ScoreModel
from .schedulers import check_schedule
from .sde import DiscreteVPSDE, broadcast_to

__all__ = ["ScoreEpsUNet", "export_pipeline", "load_pretrained"]

_PREDICTION = {"eps": "epsilon", "x0": "sample"}      # ScoreModel.output -> the scheduler's prediction_type


class ScoreEpsUNet(ModelMixin, ConfigMixin):
    """A gradscore score model around a ``UNet2DModel``, as a diffusers eps predictor.

    ``forward(sample [B, C, H, W], timestep) -> UNet2DOutput(sample=eps [B, C, H, W])`` with
    ``eps = -sigma_t s(x, t)`` at ``t = timestep / (N - 1)`` of the process ``DiscreteVPSDE(alphas_cumprod)``.
    The energy's gradient is taken inside (under a pipeline's ``no_grad`` too). ``sample_size`` and
    ``in_channels`` repeat the UNet's, which diffusers' pipelines read from ``unet.config``.

    Args:
        unet_config: the backbone's ``UNet2DModel`` config.
        alphas_cumprod: the schedule ``[N]`` the model was trained under.
        parametrisation: ``"energy"`` (``EnergyScore`` with ``energy``) or ``"score"`` (``ScoreModel`` with
            ``output``).
    """

    @register_to_config
    def __init__(self, unet_config: dict, alphas_cumprod: list[float], parametrisation: str = "energy",
                 energy: str = "inner", output: str = "score", sample_size: Any = None, in_channels: int | None = None):
        super().__init__()
        unet = UNet2DModel.from_config(unet_config)
        self.sde = DiscreteVPSDE(alphas_cumprod)
        if parametrisation == "energy":
            if energy not in ENERGIES:
                raise ValueError(f"energy must be one of {sorted(ENERGIES)}, got {energy!r}")
            self.score_model = EnergyScore(unet, self.sde, energy=energy)
        elif parametrisation == "score":
            self.score_model = ScoreModel(unet, self.sde, output=output)
        else:
            raise ValueError(f"parametrisation must be 'energy' or 'score', got {parametrisation!r}")

    def forward(self, sample: torch.Tensor, timestep: float | torch.Tensor, return_dict: bool = True
                ) -> UNet2DOutput | tuple[torch.Tensor]:
        k = torch.as_tensor(timestep, device=sample.device).to(torch.float64).reshape(-1)
        t = self.sde.t_from_timestep(k.expand(sample.shape[0]) if k.numel() == 1 else k).to(sample.dtype)
        score = self.score_model(sample, t)
        eps = -broadcast_to(self.sde.sigma(t).to(sample.dtype), sample) * score
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


def _unet_of(score_model: Any) -> UNet2DModel:
    backbone = getattr(score_model, "backbone", None)
    if not isinstance(backbone, UNet2DModel):
        raise TypeError(f"export_pipeline needs a ScoreModel or EnergyScore whose backbone is a diffusers UNet2DModel, "
                        f"got {type(score_model).__name__} with backbone {type(backbone).__name__}")
    return backbone


def export_pipeline(score_model: ScoreModel | EnergyScore, scheduler: Any, path: str | os.PathLike) -> DDPMPipeline:
    """Save ``score_model`` with ``scheduler`` as a folder that ``DDPMPipeline.from_pretrained(path)`` (and
    ``DDIMPipeline``) loads and samples, offline; returns the pipeline saved.

    ``output="eps"`` / ``"x0"``: the UNet itself, the scheduler's ``prediction_type`` set to ``epsilon`` /
    ``sample``. ``EnergyScore`` and ``output="score"``: a ``ScoreEpsUNet`` (eps from the score), ``epsilon``.
    The schedule must be the model's own (``check_schedule``), so the pipeline's timesteps mean what they meant
    in training. Draws the same samples as ``gradscore.sample(score_model, sde, shape, scheduler=...)`` from the
    same generator.
    """
    unet = _unet_of(score_model)
    check_schedule(score_model.sde, scheduler)
    if isinstance(score_model, ScoreModel) and score_model.output in _PREDICTION:
        network, prediction = unet, _PREDICTION[score_model.output]
    else:
        energy = isinstance(score_model, EnergyScore)
        if energy and score_model.energy_name not in ENERGIES:
            raise ValueError(f"an EnergyScore with a custom energy ({score_model.energy_name!r}) cannot be saved: "
                             f"its energy is code, not weights; use one of {sorted(ENERGIES)}")
        network = ScoreEpsUNet(dict(unet.config), torch.as_tensor(scheduler.alphas_cumprod).double().tolist(),
                               parametrisation="energy" if energy else "score",
                               energy=score_model.energy_name if energy else "inner",
                               output="score" if energy else score_model.output,
                               sample_size=unet.config.sample_size, in_channels=unet.config.in_channels)
        network.score_model.backbone.load_state_dict(unet.state_dict())
        network = network.to(unet.device) if unet.dtype == torch.float32 else network.to(unet.device, unet.dtype)
        prediction = "epsilon"
    sched = type(scheduler).from_config(scheduler.config, prediction_type=prediction)
    pipe = DDPMPipeline(unet=network, scheduler=sched)
    pipe.save_pretrained(os.fspath(path))
    return pipe


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _load_scheduler(folder: str, scheduler: Any) -> Any:
    """The scheduler given, else the one saved in ``folder/scheduler`` or beside a UNet folder."""
    if scheduler is not None:
        return scheduler
    import diffusers

    for where in (os.path.join(folder, "scheduler"), os.path.join(folder, os.pardir, "scheduler"), folder):
        cfg_path = os.path.join(where, "scheduler_config.json")
        if os.path.isfile(cfg_path):
            cls = getattr(diffusers, _read_json(cfg_path)["_class_name"])
            return cls.from_pretrained(where)
    raise FileNotFoundError(f"{folder!r} has no scheduler_config.json (in scheduler/, beside it or in it): "
                            "pass scheduler= (the schedule the model was trained under)")


def load_pretrained(path: str | os.PathLike, scheduler: Any = None, device: torch.device | str | None = None
                    ) -> tuple[ScoreModel | EnergyScore, DiscreteVPSDE]:
    """``(score_model, sde)`` from a local diffusers pipeline folder (``model_index.json`` with ``unet`` and
    ``scheduler``) or a UNet folder (``config.json`` of a ``UNet2DModel``; its schedule from ``scheduler=`` or a
    saved ``scheduler_config.json``). ``score_model(x [B, C, H, W], t [B]) -> score`` is in eval mode;
    ``sde = DiscreteVPSDE.from_scheduler(scheduler)``. A ``ScoreEpsUNet`` (an exported energy model) comes back
    as its own ``EnergyScore``. Raises ``FileNotFoundError`` naming the folder when it holds no model.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder (expected a diffusers pipeline or UNet folder)")
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        entry = _read_json(index).get("unet")
        if not entry:
            raise FileNotFoundError(f"{index} names no 'unet' component; gradscore loads UNet pipelines")
        model_dir = os.path.join(folder, "unet")
    else:
        model_dir = folder
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder!r} holds no model: no model_index.json and no {cfg_path}")
    class_name = _read_json(cfg_path).get("_class_name")
    sched = _load_scheduler(folder, scheduler)
    prediction = sched.config.get("prediction_type", "epsilon")
    if class_name == "ScoreEpsUNet":
        network = ScoreEpsUNet.from_pretrained(model_dir)
        check_schedule(network.sde, sched)
        model, sde = network.score_model, network.sde
        if prediction != "epsilon":
            raise ValueError(f"{model_dir}: a ScoreEpsUNet predicts eps but the scheduler says {prediction!r}")
    elif class_name == "UNet2DModel":
        unet = UNet2DModel.from_pretrained(model_dir)
        if unet.config.out_channels != unet.config.in_channels:
            raise ValueError(f"{model_dir}: the UNet has out_channels={unet.config.out_channels} for in_channels="
                             f"{unet.config.in_channels} (a learned variance?); gradscore needs one output per input")
        outputs = {v: k for k, v in _PREDICTION.items()}
        if prediction not in outputs:
            raise ValueError(f"{folder}: prediction_type={prediction!r} is not supported here (supported: "
                             f"{sorted(outputs)}); a v-prediction model needs a ScoreModel with a 'v' output")
        sde = DiscreteVPSDE.from_scheduler(sched)
        model = ScoreModel(unet, sde, output=outputs[prediction])
    else:
        raise ValueError(f"{cfg_path}: a {class_name} is not supported; gradscore loads UNet2DModel and ScoreEpsUNet")
    return model.eval().to(device or "cpu"), sde
