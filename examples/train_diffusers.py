"""Train a UNet2DModel on scikit-learn's 8x8 digits with any gradscore objective (offline, CPU or GPU).

In the style of diffusers' examples/unconditional_image_generation/train_unconditional.py: UNet2DModel,
DDPMScheduler, accelerate, diffusers' EMAModel, a DDPMPipeline folder at the end. Lines marked `# gradscore` are
the change from the plain eps loss (README, "diffusers"); lines marked `# critic` are what the objectives with a
critic (dual_sobolev, l2+dual_sobolev) add: the critic in the optimizer and in `accelerator.prepare`, and the
loop over `objective.phases()` (dual_sobolev's critic-only steps come first; every other objective has one phase).

Unconditional. The batches carry the digit labels already; a class-conditional model is two lines once the
objectives take conditioning: `num_class_embeds=10` in the UNet2DModel, and `class_labels=labels` passed to the
loss (`phase.loss(score_model, clean_images, class_labels=labels)`).

    python examples/train_diffusers.py --objective energy --max-steps 2000
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no examples/train_diffusers.py --objective l2+dual_sobolev
"""
import argparse
import hashlib
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradscore as gs
from gradscore_train.train import exit_without_finalization

SCORE_MODELS = {"score": gs.ScoreModel, "energy": gs.EnergyScore}     # by the objective's parametrisation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", default="l2", choices=sorted(gs.OBJECTIVES), help="a gradscore objective")
    p.add_argument("--output-dir", default="runs/diffusers-digits", help="the DDPMPipeline folder written at the end")
    p.add_argument("--train-batch-size", type=int, default=64, help="per process")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=100)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--num-inference-steps", type=int, default=100, help="DDPM steps of the final samples; 0: none")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check_processes(accelerator):
    """Refuse a launch whose processes did not join one group: `accelerate launch --multi_gpu` on a CPU machine
    starts WORLD_SIZE processes that each train alone unless accelerate is told to use the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise SystemExit(f"the launcher started WORLD_SIZE={world} processes but the accelerator sees "
                         f"{accelerator.num_processes} ({accelerator.distributed_type}): each would train alone. "
                         "On CPU set ACCELERATE_USE_CPU=1 (Accelerator(cpu=True)).")


def digits():
    """scikit-learn's 1797 bundled 8x8 digits as images [N, 1, 8, 8] in [-1, 1] and labels [N]."""
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0, torch.tensor(d.target)


class ScalarUNet(nn.Module):
    """The critic's potential psi(x, t) = <x, f(x, t)> / 2 from a small UNet f, one scalar per sample [B]."""

    def __init__(self):
        super().__init__()
        self.unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, add_attention=False,
                                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)

    def forward(self, x, timestep):
        return 0.5 * (x * self.unet(x, timestep).sample).flatten(1).sum(1)


def fingerprint(tensors):
    """sha256 of some weights, to see that every rank ends with the same ones."""
    h = hashlib.sha256()
    for v in tensors:
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    check_processes(accelerator)
    set_seed(args.seed)                                                   # the same initial weights on every rank
    images, labels = digits()
    train_dataloader = DataLoader(TensorDataset(images, labels), batch_size=args.train_batch_size, shuffle=True,
                                  drop_last=True)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64),
                        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    ema_model = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=UNet2DModel, model_config=model.config)

    sde = gs.DiscreteVPSDE.from_scheduler(noise_scheduler)                                      # gradscore
    score_model = SCORE_MODELS[gs.OBJECTIVES[args.objective].parametrisation](model, sde)       # gradscore
    critic = gs.Critic(ScalarUNet(), sde, time_input="timestep") \
        if gs.OBJECTIVES[args.objective].needs_critic else None                                 # critic
    objective = gs.build_objective(args.objective, sde, critic=critic)                          # gradscore

    params = [*model.parameters(), *(critic.parameters() if critic else [])]                    # critic
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup_steps * accelerator.num_processes,
                                                   args.max_steps * accelerator.num_processes)
    score_model = accelerator.prepare(score_model)                                              # gradscore
    critic = objective.critic = accelerator.prepare(critic) if critic else None                 # critic
    optimizer, train_dataloader, lr_scheduler = accelerator.prepare(optimizer, train_dataloader, lr_scheduler)
    models = [m for m in (score_model, critic) if m is not None]
    set_seed(args.seed, device_specific=True)     # each rank draws its own times and noise

    global_step, loss = 0, torch.zeros(())
    while global_step < args.max_steps:
        for clean_images, labels in train_dataloader:  # noqa: B007 (labels: the class-conditional change)
            for phase in objective.phases():                                                    # critic
                score_fn = score_model if phase.trains_model else accelerator.unwrap_model(score_model)  # critic
                with accelerator.accumulate(*models):                                           # critic
                    loss = phase.loss(score_fn, clean_images).mean()                            # gradscore
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                lr_scheduler.step()
                ema_model.step(model.parameters())
                global_step += 1
                if global_step % 100 == 0 or global_step == args.max_steps:
                    accelerator.print(f"step {global_step}: {args.objective} loss {loss.item():.4f}")
            if global_step >= args.max_steps:
                break

    # one write per line: the ranks share the terminal (print writes the text and the newline separately)
    sys.stdout.write(f"rank {accelerator.process_index}/{accelerator.num_processes}: weights "
                     f"{fingerprint(model.parameters())} ema {fingerprint(ema_model.shadow_params)}\n")
    sys.stdout.flush()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(score_model)
        ema_model.store(model.parameters())
        ema_model.copy_to(model.parameters())                              # save and sample the EMA weights
        gs.export_pipeline(unwrapped, noise_scheduler, args.output_dir)    # loads with DDPMPipeline.from_pretrained
        ema_model.restore(model.parameters())
        if args.num_inference_steps:
            pipe = DDPMPipeline.from_pretrained(args.output_dir)
            out = pipe(batch_size=16, generator=torch.Generator().manual_seed(0),
                       num_inference_steps=args.num_inference_steps, output_type="np").images
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            grid = out.reshape(4, 4, 8, 8).transpose(0, 2, 1, 3).reshape(32, 32)
            plt.imsave(os.path.join(args.output_dir, "samples.png"), grid, cmap="gray", vmin=0, vmax=1)
        print(f"wrote the pipeline {args.output_dir}")
    accelerator.end_training()
    if accelerator.num_processes > 1:
        exit_without_finalization(0)          # a gloo worker thread can abort the interpreter's finalization


if __name__ == "__main__":
    main()
