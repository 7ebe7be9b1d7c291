"""Mutation probe: does the test suite catch a one-site change of a constant or an operator?

    python tests/mutation_probe.py --list          # the mutations and the tests each one runs
    python tests/mutation_probe.py                 # all of them
    python tests/mutation_probe.py NAME [NAME...]  # some of them

Each mutation replaces one exact piece of text in one file of a temporary copy of the tree (the
working tree is never edited), then runs the test files named for it there with `pytest -x -q`.
The mutation is caught when those tests fail. A copy of the unmutated tree is checked first: its
tests must pass, or nothing is concluded. Prints caught / survived per mutation; exits 1 if any
survived (or the baseline failed).

Not collected by pytest (no test_ prefix). sslam_kernels is imported from the copy's kernels/sslam_kernels/ (an
editable install elsewhere would otherwise provide it).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: Tuple[str, ...]  # test files or node ids that must catch it


AUDIO = "sslam_fast/data/audio.py"
CONFIG = "sslam_fast/config.py"
FT = "sslam_fast/evaluation/finetune.py"
SAMPLING = "sslam_fast/evaluation/sampling.py"
METRICS = "sslam_fast/evaluation/metrics.py"
FT_TESTS = "tests/test_finetune.py"
FT_DEFAULTS = f"{FT_TESTS}::test_the_defaults_are_the_published_recipe"
FT_SCHEDULE = f"{FT_TESTS}::test_each_layer_decay_group_runs_the_original_schedule"
MUTATIONS = [
    # the three that survived the first probe
    Mutation("log_mel_floor", AUDIO, "mel.clamp_min_(torch.finfo(torch.float32).eps)", "mel.clamp_min_(1e-6)",
             ("tests/test_audio.py",)),
    Mutation("mask_noise_std", CONFIG, "mask_noise_std: float = 0.01", "mask_noise_std: float = 0.1",
             ("tests/test_model.py::test_decoder_noise_is_drawn_with_mask_noise_std",)),
    Mutation("norm_mean", AUDIO, "NORM_MEAN = -4.268", "NORM_MEAN = -4.262", ("tests/test_audio.py",)),
    Mutation("data_config_norm_mean", "sslam_fast/trainer/config.py", "norm_mean: float = -4.268",
             "norm_mean: float = -4.262", ("tests/test_config_train.py",)),
    # front end
    Mutation("preemphasis", AUDIO, "PREEMPHASIS = 0.97", "PREEMPHASIS = 0.96", ("tests/test_audio.py",)),
    Mutation("mel_low_freq", AUDIO, "LOW_FREQ = 20.0", "LOW_FREQ = 30.0", ("tests/test_audio.py",)),
    Mutation("window_25ms", AUDIO, "FRAME_LENGTH_MS = 25.0", "FRAME_LENGTH_MS = 24.0", ("tests/test_audio.py",)),
    Mutation("resample_rolloff", AUDIO, "rolloff: float = 0.99,", "rolloff: float = 0.98,", ("tests/test_audio.py",)),
    Mutation("norm_twice_std", AUDIO, "return (fbank - norm_mean) / (2.0 * norm_std)",
             "return (fbank - norm_mean) / (2.1 * norm_std)", ("tests/test_audio.py",)),
    # masking
    Mutation("mask_prob", CONFIG, "mask_prob: float = 0.8", "mask_prob: float = 0.7", ("tests/test_model.py",)),
    Mutation("mask_length", CONFIG, "mask_length: int = 5", "mask_length: int = 3", ("tests/test_model.py",)),
    Mutation("mask_prob_adjust", CONFIG, "mask_prob_adjust: float = 0.07", "mask_prob_adjust: float = 0.05",
             ("tests/test_model.py",)),
    # EMA teacher
    Mutation("ema_decay", CONFIG, "ema_decay: float = 0.9998", "ema_decay: float = 0.9999", ("tests/test_model.py",)),
    Mutation("ema_end_decay", CONFIG, "ema_end_decay: float = 0.99999", "ema_end_decay: float = 0.9999",
             ("tests/test_model.py",)),
    Mutation("ema_anneal_end_step", CONFIG, "ema_anneal_end_step: int = 100_000", "ema_anneal_end_step: int = 10_000",
             ("tests/test_model.py",)),
    # encoder, targets, decoder (a fairseq checkpoint sets norm_eps and cls_loss_weight itself, so
    # the parity tests see a change of the code, the default config test a change of the default)
    Mutation("layer_norm_eps", CONFIG, "norm_eps: float = 1e-6", "norm_eps: float = 1e-5", ("tests/test_model.py",)),
    # (eps 1e-5 there moves the teacher features by 1.8e-6 relative, under the parity tolerance)
    Mutation("input_layer_norm_eps", "sslam_fast/model.py", "self.norm = LayerNorm(D, eps=cfg.norm_eps)",
             "self.norm = LayerNorm(D, eps=1e-4)", ("tests/test_parity.py",)),
    Mutation("instance_norm_eps", CONFIG, "instance_norm_eps: float = 1e-5", "instance_norm_eps: float = 1e-6",
             ("tests/test_parity.py",)),
    Mutation("target_norm_eps", CONFIG, "target_norm_eps: float = 1e-5", "target_norm_eps: float = 1e-6",
             ("tests/test_parity.py",)),
    Mutation("decoder_norm_eps", CONFIG, "decoder_norm_eps: float = 1e-5", "decoder_norm_eps: float = 1e-6",
             ("tests/test_parity.py",)),
    # losses
    Mutation("loss_scale", "sslam_fast/objectives.py", "cfg.embed_dim ** -0.5", "cfg.embed_dim ** -0.4",
             ("tests/test_parity.py",)),
    Mutation("cls_loss_weight", CONFIG, "cls_loss_weight: float = 1.0", "cls_loss_weight: float = 1.1",
             ("tests/test_model.py",)),
    Mutation("cls_loss_times_sample_size", "sslam_fast/objectives.py",
             "(cfg.cls_loss_weight * sample_size)\n    if cfg.stage == 2:\n        half = V // 2",
             "(cfg.cls_loss_weight * (sample_size + 1))\n    if cfg.stage == 2:\n        half = V // 2",
             ("tests/test_parity.py",)),
    Mutation("srl_loss_weight", CONFIG, "srl_loss_weight: float = 2.0", "srl_loss_weight: float = 1.0",
             ("tests/test_parity.py",)),
    # SSLAM mixtures and the Source Retention target
    Mutation("srl_average", "sslam_fast/objectives.py", "mixed = 0.5 * (own4.index_select(1, rows)",
             "mixed = 0.4 * (own4.index_select(1, rows)", ("tests/test_model.py",)),
    Mutation("srl_partner_roll", "sslam_fast/objectives.py",
             "shifts=1, dims=0)  # clip i-1 at index i\n    own4 = own.view",
             "shifts=-1, dims=0)  # clip i-1 at index i\n    own4 = own.view", ("tests/test_model.py",)),
    Mutation("mixture_partner_roll", "sslam_fast/mixing.py", "partner = torch.roll(fbank, shifts=1, dims=0)",
             "partner = torch.roll(fbank, shifts=-1, dims=0)", ("tests/test_mixing.py",)),
    Mutation("mix_window", CONFIG, "mix_window: int = 240", "mix_window: int = 256", ("tests/test_parity.py",)),
    Mutation("mixture_max", "sslam_fast/mixing.py", "torch.maximum(fbank, partner)", "torch.minimum(fbank, partner)",
             ("tests/test_mixing.py",)),
    # fine-tuning: head, layer decay and its schedule, weight decay, augmentations, loss, data
    Mutation("ft_head_cls_token", FT, "cls = self.encoder(fbank)[:, 0]", "cls = self.encoder(fbank)[:, 1:].mean(1)",
             (f"{FT_TESTS}::test_classifier_reads_the_cls_token",)),
    Mutation("ft_head_norm_eps", FT, "head_norm_eps: float = 1e-6\n", "head_norm_eps: float = 1e-5\n", (FT_DEFAULTS,)),
    Mutation("ft_layer_decay_exponent", FT, 'layer_decay ** (depth - int(name.split(".")[2]))',
             'layer_decay ** (depth - int(name.split(".")[2]) - 1)',
             (f"{FT_TESTS}::test_layer_decay_groups_follow_the_original",)),
    Mutation("ft_layer_decay", FT, "layer_decay: float = 0.65", "layer_decay: float = 0.75", (FT_DEFAULTS,)),
    Mutation("ft_drop_path", FT, "drop_path: float = 0.1", "drop_path: float = 0.2", (FT_DEFAULTS,)),
    Mutation("ft_lr_warmup_start", FT, "return floor + step * (peak - floor) / warmup", "return step * peak / warmup",
             (FT_SCHEDULE,)),
    Mutation("ft_lr_flat_below_floor", FT, "if peak <= floor:\n        return peak", "if peak <= floor:\n        return floor",
             (FT_SCHEDULE,)),
    Mutation("ft_lr_absolute_floor", FT, 'lr_floor: str = "absolute"', 'lr_floor: str = "scaled"', (FT_DEFAULTS,)),
    Mutation("ft_weight_decay_everywhere", FT, "wd = 0.0 if decay_exclusions and", "wd = 0.0 if not decay_exclusions and",
             (f"{FT_TESTS}::test_recipe_weight_decay_reaches_every_parameter",)),
    Mutation("ft_mixup_reversed_partner", FT, "(1 - lam) * fbank.flip(0)", "(1 - lam) * fbank.roll(1, 0)",
             (f"{FT_TESTS}::test_augmentations",)),
    Mutation("ft_mixup_probability", FT, "rng.random() < prob", "rng.random() > prob", (f"{FT_TESTS}::test_augmentations",)),
    Mutation("ft_mixup_alpha", FT, "mixup: float = 0.8", "mixup: float = 0.7", (FT_DEFAULTS,)),
    Mutation("ft_mixup_prob", FT, "mixup_prob: float = 0.9", "mixup_prob: float = 0.8", (FT_DEFAULTS,)),
    Mutation("ft_mask_width", FT, "width = rng.random(B) * ratio * size", "width = rng.random(B) * 2 * ratio * size",
             (f"{FT_TESTS}::test_augmentations",)),
    Mutation("ft_mask_ratio", FT, "mask_ratio: float = 0.2", "mask_ratio: float = 0.3", (FT_DEFAULTS,)),
    Mutation("ft_roll_gain", FT, "float(rng.beta(10, 10) + 0.5)", "float(rng.beta(10, 10) + 0.6)",
             (f"{FT_TESTS}::test_roll_augmentation_gain_is_beta_10_10_plus_half",)),
    Mutation("ft_loss_normaliser", FT, "return target.sum(dtype=torch.float64)", "return target.sum(dtype=torch.float64) + 1",
             (f"{FT_TESTS}::test_losses_and_their_normalisers_follow_the_original",)),
    # (a uniform scale of the loss is invisible to Adam: the change here is the normaliser's extent)
    Mutation("ft_loss_over_global_batch", FT, "normaliser = self.module.loss_normaliser(target)",
             "normaliser = self.module.loss_normaliser(target[:sizes[0]])",
             (f"{FT_TESTS}::test_mixup_and_loss_normaliser_span_the_global_batch",)),
    Mutation("ft_min_samples", FT, "ORIGINAL_MIN_SAMPLES = 10_000", "ORIGINAL_MIN_SAMPLES = 1_000",
             (f"{FT_TESTS}::test_entries_under_10000_samples_leave_both_splits",)),
    # evaluation: sampling weights and metrics
    Mutation("sampling_count_offset", SAMPLING, "LABEL_COUNT_OFFSET = 0.01", "LABEL_COUNT_OFFSET = 0.1",
             ("tests/test_evaluation.py::test_balanced_weights_by_hand",)),
    Mutation("sampling_without_replacement", SAMPLING, "replacement: bool = False,", "replacement: bool = True,",
             ("tests/test_evaluation.py::test_balanced_sampler_is_deterministic_per_seed_and_epoch",)),
    Mutation("metrics_ap_precision", METRICS, "precision = tps / (ends + 1)", "precision = tps / (ends + 2)",
             ("tests/test_evaluation.py::test_average_precision_matches_sklearn_on_random_cases",)),
    Mutation("metrics_accuracy_top_k", METRICS, "ranked_above.sum(axis=1) < top_k", "ranked_above.sum(axis=1) <= top_k",
             ("tests/test_evaluation.py::test_accuracy_top1_and_top_k",)),
    # the fused add + LayerNorm's weight gradient
    Mutation("add_layer_norm_dw", "kernels/sslam_kernels/norm_act.py", "dw += tl.sum(g * z, axis=0)", "dw += tl.sum(g, axis=0)",
             ("tests/test_kernels_norm_act.py",)),
]


def copy_tree(dest: str) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, as they are on disk."""
    listed = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def environment(tree: str, pkgs: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkgs, tree])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_tests(tree: str, env: dict, tests) -> Tuple[bool, float, str]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=tree, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, time.time() - start, lines[-1] if lines else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:26s} {m.path}: {m.original!r} -> {m.replacement!r}  [{' '.join(m.tests)}]")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; see --list")
    chosen = [by_name[n] for n in args.names] if args.names else MUTATIONS

    with tempfile.TemporaryDirectory(prefix="mutation_probe_") as tmp:
        tree, pkgs = os.path.join(tmp, "tree"), os.path.join(tmp, "pkgs")
        copy_tree(tree)
        os.makedirs(pkgs)
        os.symlink(os.path.join(tree, "kernels", "sslam_kernels"), os.path.join(pkgs, "sslam_kernels"))
        env = environment(tree, pkgs)
        where = subprocess.run([sys.executable, "-c", "import sslam_fast, sslam_kernels; "
                                "print(sslam_fast.__file__); print(sslam_kernels.__file__)"],
                               cwd=tree, env=env, capture_output=True, text=True, check=True).stdout.split()
        if not all(os.path.realpath(w).startswith(os.path.realpath(tree)) for w in where):
            print(f"the copy's packages are not the ones imported: {where}")
            return 1
        for m in chosen:
            text = open(os.path.join(tree, m.path)).read()
            if text.count(m.original) != 1:
                print(f"{m.name}: {m.original!r} occurs {text.count(m.original)} times in {m.path}, not once")
                return 1

        baseline = sorted({t for m in chosen for t in m.tests})
        ok, seconds, summary = run_tests(tree, env, baseline)
        print(f"baseline (unmutated): {'pass' if ok else 'FAIL'} in {seconds:.0f} s: {summary}", flush=True)
        if not ok:
            return 1

        survived = []
        for m in chosen:
            path = os.path.join(tree, m.path)
            text = open(path).read()
            with open(path, "w") as f:
                f.write(text.replace(m.original, m.replacement))
            try:
                passed, seconds, summary = run_tests(tree, env, m.tests)
            finally:
                with open(path, "w") as f:
                    f.write(text)
            if passed:
                survived.append(m.name)
            print(f"{m.name:26s} {'SURVIVED' if passed else 'caught  '} {seconds:5.0f} s  {summary}", flush=True)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
