"""`sslam-fast` command line: a registry of subcommands (manifest, norm-stats, train, finetune, demo,
extract, tag, export, ...).

A subcommand is registered with `register(name, help, add_arguments, run)`; `run(args)` returns the
exit status. A project error (bad config, checkpoint, audio, manifest, a missing file) is one line
`sslam-fast: error: ...` and exit status 1; `--debug` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

SUBCOMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int]) -> None:
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} registered twice")
    SUBCOMMANDS[name] = (help, add_arguments, run)


def _manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="folder scanned recursively for wav/flac/ogg/mp3")
    p.add_argument("-o", "--output", help="manifest to write (default: DIRECTORY/train.tsv)")


def _manifest_run(args: argparse.Namespace) -> int:
    from .data.manifest import write_manifest

    out = args.output or os.path.join(args.directory, "train.tsv")
    written, bad = write_manifest(args.directory, out)
    for path, reason in bad:
        print(f"left out {path}: {reason}", file=sys.stderr)
    print(f"wrote {out}: {written} entries, {len(bad)} unreadable files left out")
    return 0


def _norm_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="fairseq manifest (.tsv) or a folder of audio files")
    p.add_argument("--target-length", type=int, default=1024)
    p.add_argument("--max-clips", type=int, default=None, help="use only the first N clips (manifest order)")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))


def _norm_stats_run(args: argparse.Namespace) -> int:
    from .data.tools import norm_stats

    mean, std, clips = norm_stats(args.manifest, args.target_length, args.max_clips, args.num_workers)
    print(f"clips {clips}\nnorm_mean {mean:.4f}\nnorm_std {std:.4f}")
    return 0


def _check_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="fairseq manifest (.tsv) or a folder of audio files")
    p.add_argument("-o", "--output", help="also write the manifest without the bad entries here (and its .lbl, if the input has one)")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--max-seconds", type=float, default=None, help="longest clip accepted (default: the loader's limit)")


def _check_data_run(args: argparse.Namespace) -> int:
    from .data.loader import MAX_SECONDS
    from .data.tools import check_manifest, write_clean_manifest

    manifest, bad = check_manifest(args.manifest, args.num_workers, args.max_seconds or MAX_SECONDS)
    where = (lambda i: manifest.path(i)) if os.path.isdir(args.manifest) else (lambda i: f"{manifest.source}:{i + 2}: {manifest.path(i)}")
    for index, reason in bad:
        print(f"{where(index)}: {reason}", file=sys.stderr)
    print(f"{len(manifest) - len(bad)} of {len(manifest)} entries decode; {len(bad)} would be skipped")
    if args.output:
        labels = write_clean_manifest(manifest, [index for index, _ in bad], args.output)
        print(f"wrote {args.output}" + (f" and {labels}" if labels else ""))
    return 1 if bad else 0


def _demo_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="output folder (audio/ and train.tsv are written there)")
    p.add_argument("--num-clips", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--seed", type=int, default=0)


def _demo_data_run(args: argparse.Namespace) -> int:
    from .data.tools import make_demo_dataset

    manifest = make_demo_dataset(args.directory, args.num_clips, args.seconds, args.sample_rate, args.seed)
    print(f"wrote {args.num_clips} clips and {manifest}")
    return 0


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="folder with one subfolder of audio files per class (its name is the label)")
    p.add_argument("-o", "--output", required=True, help="task directory to write (data.dir of a finetune config)")
    p.add_argument("--eval-every", type=int, default=4, help="every N-th file of each class goes to eval.tsv (default 4)")


def _task_run(args: argparse.Namespace) -> int:
    from .data.manifest import write_task_from_folders

    counts, bad = write_task_from_folders(args.directory, args.output, args.eval_every)
    for path, reason in bad:
        print(f"left out {path}: {reason}", file=sys.stderr)
    print(f"wrote {args.output}: train {counts['train']}, eval {counts['eval']} entries, "
          f"label_descriptors.csv; {len(bad)} unreadable files left out")
    return 0


register("manifest", "write a fairseq manifest for a folder of audio files", _manifest_args, _manifest_run)
register("task-from-folders", "write a fine-tuning task directory (train/eval .tsv and .lbl, label_descriptors.csv) "
         "from one subfolder of audio files per class", _task_args, _task_run)
register("norm-stats", "mean and std of a dataset's padded fbanks (data.norm_mean / data.norm_std of the train and finetune configs)", _norm_stats_args, _norm_stats_run)
register("check-data", "decode every entry of a manifest as the loader would; report (exit 1) and drop the bad ones", _check_data_args, _check_data_run)
register("demo-data", "write a small synthetic dataset with a manifest (no downloads)", _demo_data_args, _demo_data_run)


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_MANIFEST", help="audio files, fairseq manifests (.tsv) or folders")
    p.add_argument("--checkpoint", required=True,
                   help="any checkpoint load_encoder reads: a run's step directory or train.pt, original or own .pt, safetensors, HF folder")
    p.add_argument("--granularity", choices=["all", "frame", "utterance"], default="utterance",
                   help="utterance: [D]; frame: [rows, 8, D]; all: [windows, 1 + P, D] (default utterance)")
    p.add_argument("--which", choices=["student", "teacher"], default="student")
    p.add_argument("-o", "--output", required=True, help="folder for one .npy per input, or a .npz file for all")
    p.add_argument("--batch-size", type=int, default=8, help="windows (of the model's clip length) per forward")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    _norm_override_args(p)
    _precision_args(p)
    _max_seconds_arg(p)


def _norm_override_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norm-mean", type=float, default=None,
                   help="override the fbank mean the checkpoint states (default: the checkpoint's; AudioSet's -4.268 for original checkpoints)")
    p.add_argument("--norm-std", type=float, default=None,
                   help="override the fbank std the checkpoint states (default: the checkpoint's; AudioSet's 4.569 for original checkpoints)")


def _precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="how the model computes: auto = bf16 on a CPU with native bf16 (AVX512-BF16 / AMX), checked "
                        "against fp32 on the first window, else fp32; int8 = dynamic int8 Linear layers (CPU)")
    p.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")


def _max_seconds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-seconds", type=float, default=86400.0,
                   help="longer files are refused (default 86400, a day; files over 60 s are streamed in bounded memory)")


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _report_bad(bad) -> None:
    for path, reason in bad:
        print(f"skipped {path}: {reason}", file=sys.stderr)


def _extract_run(args: argparse.Namespace) -> int:
    from .released.encoder import load_encoder
    from .released.tools import extract_files

    encoder = load_encoder(args.checkpoint, args.which, args.norm_mean, args.norm_std)
    print(f"{encoder.found}; {encoder.input.describe()}", file=sys.stderr)
    written, bad = extract_files(encoder, args.inputs, args.output, args.granularity, args.which, args.batch_size,
                                 args.device, precision=args.precision, report=_say, max_seconds=args.max_seconds)
    _report_bad(bad)
    print(f"wrote features of {len(written)} files to {args.output}; {len(bad)} skipped")
    return 1 if bad else 0


def _tag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="audio files, fairseq manifests (.tsv) or folders")
    p.add_argument("--checkpoint", required=True,
                   help="a fine-tuned checkpoint: a fine-tuning run's step directory or train.pt, an original one, safetensors or HF folder")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--windows", action="store_true", help="also the top-k of each window (10.24 s for the released models) with its time span")
    _norm_override_args(p)
    _precision_args(p)
    _max_seconds_arg(p)


def _tag_run(args: argparse.Namespace) -> int:
    import json

    from .released.encoder import load_classifier
    from .released.tools import tag_files

    classifier = load_classifier(args.checkpoint, args.norm_mean, args.norm_std)
    print(f"{classifier.encoder.found}; {classifier.input.describe()}", file=sys.stderr)
    results, bad = tag_files(classifier, args.files, args.top_k, args.batch_size, args.device, precision=args.precision,
                             windows=args.windows, report=_say, max_seconds=args.max_seconds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(result["file"])
            for label in result["labels"]:
                print(f"  {label['probability']:.3f}  {label['name']} ({label['mid'] or label['index']})")
            for window in result.get("windows", []):
                top = ", ".join(f"{label['name']} {label['probability']:.2f}" for label in window["labels"])
                print(f"  {window['start_s']:8.2f} - {window['end_s']:8.2f} s: {top}")
    _report_bad(bad)
    return 1 if bad else 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="any checkpoint load_encoder / load_classifier reads (a run's step directory too)")
    p.add_argument("--format", required=True, choices=["safetensors", "hf", "fairseq", "onnx"])
    p.add_argument("-o", "--output", required=True, help="file (safetensors, fairseq .pt, .onnx) or folder (hf)")
    p.add_argument("--which", choices=["student", "teacher"], default="student", help="the encoder ONNX exports")
    _norm_override_args(p)


def _export_run(args: argparse.Namespace) -> int:
    from .released.export import export

    export(args.checkpoint, args.format, args.output, args.which, args.norm_mean, args.norm_std)
    print(f"wrote {args.output}")
    return 0


register("extract", "features of audio files from a released or trained model (.npy per file or one .npz)", _extract_args, _extract_run)
register("tag", "top-k classes of audio files from a fine-tuned model (AudioSet's, or a fine-tuning run's labels)", _tag_args, _tag_run)
register("export", "convert a checkpoint to safetensors, a Hugging Face folder, the original fairseq layout or ONNX", _export_args, _export_run)


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train import add_arguments

    add_arguments(p)


def _train_run(args: argparse.Namespace) -> int:
    from .train import run_from_args

    return run_from_args(args)


register("train", "pretrain (stage 1 or 2) from a JSON config; multi-GPU: deepspeed sslam_fast/train.py", _train_args, _train_run)


def _balanced_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("labels", help="<split>.lbl of the training set (one 'id<TAB>label,label' line per manifest entry)")
    p.add_argument("-o", "--output", required=True, help="weights file to write (one weight per line, as the original reads it)")
    p.add_argument("--descriptors", help="label_descriptors.csv (default: the one beside LABELS)")


def _balanced_weights_run(args: argparse.Namespace) -> int:
    from .evaluation.sampling import write_weights

    weights = write_weights(args.labels, args.output, descriptors=args.descriptors)
    print(f"wrote {args.output}: {len(weights)} clip weights, min {weights.min():.4g}, max {weights.max():.4g}")
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    from .finetune import add_arguments

    add_arguments(p)


def _finetune_run(args: argparse.Namespace) -> int:
    from .finetune import run_from_args

    return run_from_args(args)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a smaller run for CI (about a minute or two on 2 CPU cores)")
    p.add_argument("--out", default="runs/demo", help="output folder (benchmark, pretraining runs, results.json, demo.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="pretraining precision: bf16 = CPU bf16 autocast with fp32 masters (fast on CPUs with AVX512-BF16 / AMX)")


def _demo_run(args: argparse.Namespace) -> int:
    import logging

    from .evaluation.demo import DemoError, run_demo, summary

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        results = run_demo(args.out, quick=args.quick, seed=args.seed, precision=args.precision)
    except DemoError as e:
        print(f"sslam-fast demo: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary(results)))
    return 0


register("demo", "build the polyphonic benchmark, pretrain stage 1 vs stage 1 + 2 at equal compute, linear-probe both",
         _demo_args, _demo_run)
register("balanced-weights", "per-clip balanced-sampling weights of a label file (AudioSet-2M fine-tuning)",
         _balanced_weights_args, _balanced_weights_run)
register("finetune", "fine-tune or linearly evaluate from a JSON config; multi-GPU: deepspeed sslam_fast/finetune.py",
         _finetune_args, _finetune_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslam-fast", description="Fast SSLAM / EAT audio self-supervised pretraining")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, add_arguments, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return parser


def _project_error(e: BaseException) -> bool:
    from .config import ConfigError
    from .data.audio import AudioError
    from .data.manifest import ManifestError
    from .serialization import CheckpointError

    return isinstance(e, (ConfigError, CheckpointError, AudioError, ManifestError, OSError))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][2](args)
    except Exception as e:
        if args.debug or not _project_error(e):
            raise
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"sslam-fast: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
