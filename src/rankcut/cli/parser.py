"""The argument parser of every command; the commands' code lives in their own modules."""

from __future__ import annotations

import argparse

from ..calibration.sources import DRAWS, Calibration
from ..compress.pipeline import DTYPES
from ..core.version import __version__
from ..train.loop import PRECISIONS
from .bench import cmd_bench
from .compress import cmd_compress
from .demo import cmd_demo
from .evaluate import cmd_eval
from .export import cmd_export
from .heal import cmd_heal
from .info import cmd_info
from .report import cmd_report
from .softrank import cmd_softrank
from .sweep import cmd_sweep

# the first line of `rankcut --help`
DESCRIPTION = "The `rankcut` command. Every error a user can cause prints one line and exits with 2."


def _add_training_run(p: argparse.ArgumentParser, eval_help: str) -> None:
    """What every fine-tuning command takes: seed, checkpoints, evaluation and output."""

    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: teacher and student forwards in bfloat16 under autocast (weights, optimizer "
                        "and losses stay float32); 1.5-1.6x faster steps on a CPU with AVX512-BF16")
    p.add_argument("--task-weight", type=float, default=1.0,
                   help="weight of the task loss (next-token cross-entropy, or the GLUE labels' cross-entropy)")
    p.add_argument("--distill-temperature", type=float, default=None,
                   help="temperature of the logit distillation (KL to the dense model's softened outputs, scaled by "
                        "T²); default: heal 1 (measured best on SmolLM2), softrank 2 (its GLUE recipe)")
    p.add_argument("--checkpoint", default=None, help="folder for checkpoints (every --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint")
    p.add_argument("--eval", action="store_true", help=eval_help)
    p.add_argument("--eval-limit", type=int, default=None, help="tokens (lm) or examples (GLUE) to score")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU if there is one), cpu, cuda or cuda:N")


def _add_calib_draw(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-draw", choices=DRAWS, default=Calibration.draw,
                   help="how calibration windows are drawn: spread (one per document, across the whole "
                        "text) or contiguous (consecutive windows from the first documents of a shuffled order)")


def _add_selection(p: argparse.ArgumentParser, default: str | None = "all-linear") -> None:
    p.add_argument("--targets", default=default,
                   help="all-linear, a comma list of kinds (q,k,v,o,gate,up,down,...), or a regex; add embed to "
                        "factor the token embedding and the head tied to it (compress)")
    p.add_argument("--layers", default=None, help="layer indices and ranges, e.g. 0-5,9")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankcut", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"rankcut {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="targets, shapes, parameters, break-even ranks")
    p.add_argument("model")
    _add_selection(p, default=None)
    p.add_argument("--speed", action="store_true",
                   help="also time, once per shape, the highest rank whose factors run faster than the "
                        "dense matrix on this machine (at decode and prefill sizes; sentence and batch "
                        "sizes for an encoder)")
    p.add_argument("--pivot", action="store_true", help="with --speed: time the pivoted form")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compress", help="factorize a model's weights and save it")
    p.add_argument("model")
    p.add_argument("--method", default="svd", help="svd, tucker, whiten, asvd, fisher or kfac")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", type=float, help="fraction of each module's parameters kept, in (0, 1]")
    group.add_argument("--rank", help="fixed rank N (or R1,R2 for tucker)")
    group.add_argument("--energy", type=float, help="fraction of squared singular values kept")
    group.add_argument("--budget", type=float,
                       help="fraction of all targeted parameters kept, spread unevenly by what each direction is worth")
    p.add_argument("--three-factor", action="store_true", help="tucker: keep the r1×r2 core as its own linear")
    p.add_argument("--speed", action="store_true",
                   help="also store each factor in the memory order its matmul runs fastest in, and put back "
                        "as dense every module that is not faster factored, both as timed on this machine at "
                        "the model's workloads: decode and prefill sizes for a generating model, sentence and "
                        "batch sizes for an encoder (recorded in rankcut.json; rankcut.load redoes both). "
                        "With --budget, each shape's highest rank that runs faster than dense is timed first "
                        "and the budget gives every module a rank up to it or keeps it dense, so the budget "
                        "still holds")
    p.add_argument("--allow-growth", action="store_true", help="allow ranks past the break-even rank")
    p.add_argument("--pivot", action="store_true",
                   help="store factors pivoted: r of the output rows kept exactly, the rest as their "
                        "combinations (the same map in r² fewer numbers, so a budget buys a higher rank)")
    p.add_argument("--calib", default="gensim-wiki",
                   help="calibration text for whiten/asvd/fisher: gensim-wiki, gensim-news, a train split "
                        "(sst2, mrpc, rte, stsb, gsm8k) or a text file")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    _add_calib_draw(p)
    p.add_argument("--mlp-channels", type=float, default=None, metavar="F",
                   help="first keep this fraction of every MLP's intermediate channels, cut jointly (Nyström: "
                        "up/gate rows dropped, down refit on the calibration text); --method then cuts --targets")
    p.add_argument("--mlp-select", choices=("leverage", "output"), default="leverage",
                   help="how --mlp-channels chooses: ridge leverage of down's inputs (MoDeGPT) or greedily by "
                        "down's output error")
    p.add_argument("--attn-channels", type=float, default=None, metavar="F",
                   help="first keep this fraction of every attention head's channels, cut jointly (MoDeGPT: "
                        "Q with K by column-row selection, V with O by a whitened SVD); --method then cuts the "
                        "rest of --targets")
    p.add_argument("--two-pass", action="store_true",
                   help="--budget: allocate ranks in a first pass, then compress block by block on the "
                        "compressed model's activations (better, about twice the time)")
    p.add_argument("--staged", action="store_true",
                   help="sequential calibration inside each block too: every input group (q/k/v, o, "
                        "gate/up, down) on the outputs of the groups already cut (better, slower)")
    p.add_argument("--shrink", type=float, default=None,
                   help="--method kfac: blend the output gradients' covariance towards its diagonal (0: the full "
                        "covariance, 1: the Fisher method's diagonal)")
    p.add_argument("--anchor", type=float, default=None,
                   help="whiten/fisher/kfac: refit each module's kept input factor so that its outputs on the cut "
                        "model's inputs match the dense outputs, with this ridge (relative to the mean of XᵀX's "
                        "diagonal) pulling towards the plain truncation; with --budget add --two-pass")
    p.add_argument("--no-sequential", action="store_true",
                   help="calibrate every block on the dense model's activations (faster, less accurate)")
    _add_selection(p)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="load the model in this precision, and store its factors in it (auto: the precision the "
                        "checkpoint was saved in; bfloat16: half the bytes of float32). Each block is computed in "
                        "float32 while it is worked on; --speed decides at this precision")
    p.add_argument("--device", default="auto",
                   help="where each block is calibrated and factorized: auto (a GPU if there is one), cpu, cuda, "
                        "cuda:N; the model stays on the CPU and one block at a time is moved there")
    p.add_argument("--offload", choices=["disk", "none"], default=None,
                   help="disk: read each block's weights from the checkpoint's safetensors shards when it is needed "
                        "and write it to the output as soon as it is done (memory holds a block or two, whatever the "
                        "model's size); none: load the model whole. Default: stream only if it would not fit")
    p.add_argument("--checkpoint", default=None,
                   help="folder that receives each finished block, so that a killed compression can go on "
                        "with --resume (same command) to the same result; removed once the model is saved")
    p.add_argument("--resume", action="store_true", help="continue the compression checkpointed in --checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity and zero-shot benchmarks")
    p.add_argument("model")
    p.add_argument("--tasks", default=None, help="comma list: wikitext2, arc_easy, ..., or zero-shot-six")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="also the perplexity of this UTF-8 text file (repeatable)")
    p.add_argument("--task-file", action="append", default=[], metavar="FILE.jsonl",
                   help='also these multiple-choice questions, one per line: {"query": ..., "choices": [...], '
                        '"gold": N}; acc and acc_norm as lm-eval scores ARC (repeatable)')
    p.add_argument("--limit", type=int, default=None,
                   help="perplexity: first N tokens; other tasks: the first N questions, as lm-eval's --limit")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="with --limit: score a seeded random sample of N questions instead of the first N "
                        "(the JSON lists which)")
    p.add_argument("--data-dir", default=None,
                   help="benchmark files (default: ../shared/data or $RANKCUT_DATA_DIR), or 'hub' for the HF hub")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (capped at the model's maximum)")
    p.add_argument("--harness", choices=["rankcut", "lm-eval"], default="rankcut")
    p.add_argument("--out", default=None, help="write the results document here (JSON)")
    p.add_argument("--json", action="store_true")
    _add_device(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="params, bytes, FLOPs, latency, memory; --vs for a side-by-side")
    p.add_argument("model")
    p.add_argument("--vs", default=None, help="a second model, timed interleaved with the first")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode", type=int, default=0, help="also time greedy decoding of N new tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="peak memory of a prefill, each model in its own process")
    p.add_argument("--breakdown", action="store_true",
                   help="with --vs: time the targeted linear maps apart from the rest, and the speed-up's ceiling")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU if there is one), cpu, cuda or cuda:N (GPU timings synchronize the device)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="cast both models to this precision before timing (default: each as stored)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="evaluate many configurations of a design space (resumable)")
    p.add_argument("model")
    p.add_argument("--space", required=True, help="a YAML file describing the space (see rankcut.study.space)")
    p.add_argument("--tasks", default=None, help="benchmarks to run on the proxy's Pareto front")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", required=True, help="JSONL file; rows are appended, a rerun resumes")
    p.add_argument("--proxy-tokens", type=int, default=1024)
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (default: a local Ray)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--baselines", action="store_true",
                   help="also: layer dropping and a global-budget allocation at each configuration's size")
    p.add_argument("--no-front-baselines", dest="front_baselines", action="store_false",
                   help="benchmark only the configurations' front, not the baselines at its sizes")
    p.add_argument("--baseline-method", default="fisher", help="the method whose worths drive the budget baseline")
    p.add_argument("--json", action="store_true")
    _add_device(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="table.md, pareto.png and sensitivity.png from a sweep's results")
    p.add_argument("results")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="a saved compressed model as a plain dense Hugging Face folder")
    p.add_argument("model", help="a folder written by `rankcut compress --out` (or rankcut.save)")
    p.add_argument("--dense", action="store_true", required=True,
                   help="multiply the factors back into dense weights: the folder loads anywhere a dense "
                        "checkpoint does (transformers without rankcut, llama.cpp's converter, vLLM, ONNX); it keeps "
                        "the compressed model's outputs and gives up its size and speed")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("softrank", help="SoftLMs: learn per-layer ranks under a budget in a short fine-tune")
    p.add_argument("model")
    p.add_argument("--task", default="lm", help="lm or wikitext2 (decoders: trained on gensim Wikipedia, scored on wikitext2), sst2, mrpc")
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the targeted parameters to keep")
    p.add_argument("--method", default="whiten", help="factors to start from: svd, whiten, fisher, asvd")
    p.add_argument("--fisher-examples", type=int, default=256,
                   help="--init fisher: training examples whose loss gradients measure every direction")
    p.add_argument("--init", default="uniform", choices=["uniform", "budget", "fisher"],
                   help="starting ranks: uniform; the method's global budget allocation; or allocated by "
                        "the task loss's Fisher information of every direction (--fisher-examples)")
    p.add_argument("--static", action="store_true",
                   help="baseline: fine-tune the starting cut with the same steps and data, ranks fixed")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128, help="training sequence length (lm)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threshold-lr", type=float, default=2e-3)
    p.add_argument("--distill", type=float, default=1.0, help="weight of the distillation from the dense model")
    p.add_argument("--hidden-distill", type=float, default=1.0,
                   help="weight of matching each layer's hidden states to the dense model's (0: logits only)")
    p.add_argument("--penalty", type=float, default=10.0, help="weight of the budget penalty")
    p.add_argument("--rank-phase", type=float, default=0.5,
                   help="fraction of the steps that learn ranks; the cut is made then and the rest heal it (1: cut at the end)")
    p.add_argument("--threshold-step", default="scaled", choices=["scaled", "adam"],
                   help="thresholds step by their gradient over the largest one (scaled), or by Adam")
    p.add_argument("--gate", action="store_true",
                   help="select directions by the threshold without shrinking the kept singular values "
                        "(straight-through gradient) instead of SoftLMs' soft threshold max(s − τ, 0)")
    p.add_argument("--project", default="proportional", choices=["proportional", "shared", "off"],
                   help="after each step bring the hard count back within budget: every layer's live "
                        "directions cut by the same fraction, or every threshold raised by the same "
                        "amount, or not at all (penalty only)")
    p.add_argument("--calib", default="gensim-wiki")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    _add_calib_draw(p)
    _add_training_run(p, "score dense and result on the task's held-out set")
    _add_selection(p)
    _add_device(p)
    p.set_defaults(func=cmd_softrank)

    p = sub.add_parser("heal", help="fine-tune a compressed model towards its dense source, ranks fixed")
    p.add_argument("model", help="a folder saved by rankcut compress / softrank")
    p.add_argument("--task", default="lm", help="lm or wikitext2 (decoders: trained on gensim Wikipedia, scored on wikitext2), sst2, mrpc")
    p.add_argument("--teacher", default=None,
                   help="the dense model to distil from (default: the source recorded in rankcut.json)")
    p.add_argument("--steps", type=int, default=125)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128, help="training sequence length (lm)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--distill", type=float, default=1.0, help="weight of the distillation from the dense model")
    p.add_argument("--eval-every", type=int, default=0,
                   help="with --eval: also score every N steps (the healing curve, in the JSON's `curve`)")
    p.add_argument("--hidden-distill", type=float, default=1.0,
                   help="weight of matching each layer's hidden states to the dense model's (0: logits only)")
    _add_training_run(p, "score the model before and after on the task's held-out set")
    _add_device(p)
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("demo", help="the main job on the embedded default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="kfac")
    p.add_argument("--keep", type=float, default=0.8,
                   help="fraction of the targeted parameters kept (a global budget for calibrated methods)")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser
