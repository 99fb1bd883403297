"""Language-model evidence on the Python standard library's own source: a teacher worth distilling,
students per encoding at equal bytes, and the bytes-vs-fidelity curves at V = 32k and 128k.

    OMP_NUM_THREADS=1 python pipelines/lm_stdlib.py OUT --threads 1

The defaults are the setting measured in docs/results.md (about half an hour on a 2-core machine
shared with other jobs; one torch thread, since two threads on two contended cores ran at half
the speed of one).

Everything is built here, offline, from the interpreter's own files:

1. Corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages
   excluded), sorted by relative path, cut at blank lines into documents of at least DOC_CHARS
   characters; every EVERY-th document is kept. kdcache's text split then holds every tenth kept
   document out (``test``). Files that are not UTF-8 are skipped (the list is deterministic).
2. Tokenizers: byte-level BPE (``tokenizers``) trained on every stdlib document except the
   held-out ones, at VOCAB (32,000) and BIG_VOCAB (128,000). The stdlib has fewer distinct
   pre-tokenized words than 128k merges need; the rest of the vocabulary is then filled with
   reserved special tokens (as Llama 3's 256 reserved ids are), so the head has BIG_VOCAB rows.
3. Teachers: GPT-2 configs (``transformers``) trained with ``kdcache train`` (cross-entropy) at
   each vocabulary size; the 32k one is the teacher of the students.
4. Curves: the held-out split dumped by each teacher in float16, int8, topk:K and sampled:S;
   bytes per token on disk, and the store's recorded fidelity KL(teacher || decoded) at T = 1, 2
   (against the teacher's float32 logits). For sampled:S that KL is infinite (p_hat = 0 outside
   the draws), so the missing teacher mass 1 - sum_drawn p and KL(p_hat || p) at T = 1 are
   measured instead, against the float16 store.
5. Students: the train split dumped in float16 and in each encoding of PAIRS (topk:K and
   sampled:S of about equal bytes); per seed a CE-only student and one distilled from each store
   (forward KL, T = 1, alpha = 0.5). Held-out perplexity and top-1 ECE (15 bins) of each.
6. Gradient angle: for each seed's CE-only student, on the first ANGLE_BATCHES training batches,
   the angle between the gradient (over all student parameters) of the soft loss from each
   store and the one from the dense float16 store.

Writes OUT/results.json after every stage (a run cut short keeps what it measured) and prints
markdown tables; re-running reuses the corpus, tokenizers and trained teachers already in OUT
(``--retrain`` trains them again) and measures every store again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache import DistillConfig, TrainConfig, distill, open_sequence_store, train
from kdcache.choices import LR_SCHEDULES
from kdcache.config import DumpConfig
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import build_text_dataset, collate
from kdcache.logits.sampled import SampledLogits
from kdcache.logits.sequence_losses import TokenDistillationLoss

HELD_OUT_EVERY = 10
EOS = "<|endoftext|>"


def stdlib_documents(doc_chars: int) -> list[str]:
    """Every stdlib source file, in sorted path order, cut at blank lines into documents."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if "site-packages" not in p.parts),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    out = []
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if "\0" in text:
            continue
        current: list[str] = []
        for paragraph in text.split("\n\n"):
            current.append(paragraph)
            if sum(map(len, current)) >= doc_chars:
                out.append("\n\n".join(current))
                current = []
        if current and sum(map(len, current)) > 0:
            out.append("\n\n".join(current))
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    learned = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(max(0, vocab_size - learned))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS)
    return wrapped, learned


def write_config(folder: Path, tokenizer: Any, shape: str, max_length: int) -> None:
    from transformers import GPT2Config

    layers, width = (int(x) for x in shape.split("x"))
    GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_length,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text}) + "\n")


def build_corpora(out: Path, args: argparse.Namespace, results: dict) -> dict[str, str]:
    """The teachers' corpus, the students' (a part of its training documents), the curves' text
    (held-out documents only) and the tokenizers; returns their text specs by name.

    kdcache holds out every tenth document of a file; the students' file puts one of the
    teachers' held-out documents after every nine of its training documents, so no model ever
    trains on a document that any model is evaluated on."""
    documents = stdlib_documents(args.doc_chars)
    kept = documents[:: args.every]
    train_docs = [d for i, d in enumerate(kept) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    test_docs = [d for i, d in enumerate(kept) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    student_train = train_docs[:: args.students_every]
    students: list[str] = []
    for group in range(0, len(student_train), HELD_OUT_EVERY - 1):
        students += student_train[group : group + HELD_OUT_EVERY - 1]
        students.append(test_docs[(group // (HELD_OUT_EVERY - 1)) % len(test_docs)])
    write_jsonl(out / "stdlib.jsonl", kept)
    write_jsonl(out / "students.jsonl", students)
    write_jsonl(out / "curve.jsonl", test_docs[: args.curve_docs])
    results["corpus"] = {
        "stdlib": sysconfig.get_paths()["stdlib"],
        "documents": len(documents),
        "teacher_train_documents": len(train_docs),
        "held_out_documents": len(test_docs),
        "student_train_documents": len(student_train),
        "curve_documents": min(args.curve_docs, len(test_docs)),
        "kept_chars": sum(map(len, kept)),
    }
    held_out = set(test_docs)
    tokenizer_texts = [doc for doc in documents if doc not in held_out]
    for name, vocab in (("32k", args.vocab), ("128k", args.big_vocab)):
        folder = out / f"tokenizer-{name}"
        if not (folder / "tokenizer.json").exists():
            tokenizer, learned = train_tokenizer(tokenizer_texts, vocab)
            tokenizer.save_pretrained(folder)
            (folder / "learned.json").write_text(json.dumps({"learned": learned}))
        learned = json.loads((folder / "learned.json").read_text())["learned"]
        results.setdefault("tokenizers", {})[name] = {"vocab": vocab, "learned_bpe": learned}
    return {
        name: f"text:{out / f'{name}.jsonl'}:{args.max_length}"
        for name in ("stdlib", "students", "curve")
    }


def load_tokenizer(folder: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def train_teacher(out: Path, name: str, data: str, args: argparse.Namespace, **run: Any) -> Path:
    best = out / f"teacher-{name}" / "best"
    if best.exists() and not args.retrain:
        return best
    init = out / f"teacher-{name}-init"
    write_config(init, load_tokenizer(out / f"tokenizer-{name}"), run.pop("shape"), args.max_length)
    train(
        TrainConfig(
            model=f"hf:{init}",
            dataset=data,
            batch_size=args.batch_size,
            lr=args.lr,
            device=args.device,
            out=str(out / f"teacher-{name}"),
            overwrite=True,
            **run,
        )
    )
    return best


def dump(teacher: Path, data: str, path: Path, encoding: str, split: str, args: Any) -> Any:
    return dump_lm(
        DumpConfig(
            teacher=f"hf:{teacher}",
            dataset=data,
            split=split,
            out=str(path),
            encoding=encoding,
            batch_size=32,
            device=args.device,
            overwrite=True,
        )
    )


def chunk_bytes(store: Path) -> int:
    """Bytes of the store's chunk files alone (Zarr v3 keys ``.../c/...``): without the metadata
    and digests, whose fixed few kilobytes weigh on a short curve text but not on a real store."""
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and "c" in f.parent.parts)


def sampled_measures(sampled_path: Path, dense_path: Path) -> dict[str, float]:
    """Missing teacher mass and KL(p_hat || p) at T = 1 of a sampled store, row-averaged."""
    sampled, dense = open_sequence_store(sampled_path), open_sequence_store(dense_path)
    missing, reverse, rows = 0.0, 0.0, 0
    for start in range(0, sampled.num_sequences, 16):
        samples = list(range(start, min(start + 16, sampled.num_sequences)))
        draws = sampled.read(samples)
        assert isinstance(draws, SampledLogits)
        teacher = dense.read(samples)
        assert isinstance(teacher, torch.Tensor)  # a float16 store reads as dense rows
        log_p = torch.log_softmax(teacher.double(), dim=1)
        drawn_log_p = log_p.gather(1, draws.indices)
        p_hat = draws.probs.double()
        present = p_hat > 0
        covered = torch.where(present, drawn_log_p.exp(), 0.0).sum(dim=1)
        missing += float((1 - covered).sum())
        terms = torch.where(present, p_hat * (p_hat.clamp_min(1e-30).log() - drawn_log_p), 0.0)
        reverse += float(terms.sum())
        rows += len(p_hat)
    return {"missing_mass": missing / rows, "kl_phat_p_t1": reverse / rows}


def curves(out: Path, name: str, teacher: Path, data: str, args: argparse.Namespace) -> dict:
    encodings = (
        ["float16", "int8"]
        + [f"topk:{k}" for k in args.curve_topk.split(",")]
        + [f"sampled:{s}" for s in args.curve_sampled.split(",")]
    )
    rows: dict[str, dict] = {}
    for encoding in encodings:
        path = out / f"curve-{name}-{encoding.replace(':', '')}.zarr"
        result = dump(teacher, data, path, encoding, "train", args)
        entry: dict[str, Any] = {
            "bytes_per_token": result.bytes_per_token,
            "chunk_bytes_per_token": chunk_bytes(path) / result.num_tokens,
            "tokens": result.num_tokens,
            "dump_tokens_per_s": result.tokens_per_s,
        }
        if encoding.startswith("sampled:"):
            entry |= sampled_measures(path, out / f"curve-{name}-float16.zarr")
        elif result.fidelity is not None:
            entry |= {
                "kl_t1": result.fidelity.kl_at(1.0),
                "kl_t2": result.fidelity.kl_at(2.0),
                "top1_agreement": result.fidelity.top1_agreement,
            }
        rows[encoding] = entry
        print(f"curve {name} {encoding}: {entry}", flush=True)
    for encoding in encodings:  # a float16 store at V = 128k is 256 KB a token
        shutil.rmtree(out / f"curve-{name}-{encoding.replace(':', '')}.zarr")
    return rows


@torch.no_grad()
def evaluate(model_folder: Path, data: str, *, bins: int = 15) -> dict[str, float]:
    """Held-out perplexity and top-1 expected calibration error of next-token predictions."""
    lm = load_causal_lm(f"hf:{model_folder}")
    lm.model.eval()
    dataset = build_text_dataset(data, split="test", tokenizer=lm.tokenizer)
    nll, count = 0.0, 0
    confidence_sum = np.zeros(bins)
    correct_sum = np.zeros(bins)
    in_bin = np.zeros(bins)
    for start in range(0, len(dataset), 8):
        batch = collate(dataset, list(range(start, min(start + 8, len(dataset)))))
        logits = lm.logits(batch.input_ids, batch.attention_mask)[batch.mask]
        targets = batch.targets[batch.mask]
        log_probs = torch.log_softmax(logits, dim=-1)
        nll += float(-log_probs.gather(1, targets[:, None]).double().sum())
        count += len(targets)
        confidence, predicted = log_probs.exp().max(dim=-1)
        which = np.minimum((confidence.numpy() * bins).astype(int), bins - 1)
        np.add.at(confidence_sum, which, confidence.numpy())
        np.add.at(correct_sum, which, (predicted == targets).numpy().astype(float))
        np.add.at(in_bin, which, 1)
    ece = float(np.abs(confidence_sum - correct_sum).sum() / count)
    return {"ppl": math.exp(nll / count), "ece": ece, "accuracy": float(correct_sum.sum() / count)}


def gradient_angles(
    student: Path, data: str, stores: dict[str, Path], *, batches: int, batch_size: int
) -> dict[str, float]:
    """Mean angle (degrees) between each store's soft-loss gradient and the float16 store's."""
    lm = load_causal_lm(f"hf:{student}")
    lm.model.eval()  # no dropout: the two gradients differ by their teacher rows only
    dataset = build_text_dataset(data, split="train", tokenizer=lm.tokenizer)
    loss = TokenDistillationLoss(divergence="kd", temperature=1.0, alpha=1.0)
    readers = {name: open_sequence_store(path) for name, path in stores.items()}
    parameters = [p for p in lm.model.parameters() if p.requires_grad]
    angles: dict[str, list[float]] = {name: [] for name in stores if name != "float16"}
    order = np.random.default_rng(0).permutation(len(dataset))
    for index in range(batches):
        samples = order[index * batch_size : (index + 1) * batch_size].tolist()
        if not samples:
            break
        batch = collate(dataset, samples)
        gradients = {}
        for name, reader in readers.items():
            logits = lm.logits(batch.input_ids, batch.attention_mask)
            soft = loss(logits, reader.read(samples), batch.targets, batch.mask)["soft"]
            grads = torch.autograd.grad(soft, parameters, allow_unused=True)
            gradients[name] = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten().double()
                    for g, p in zip(grads, parameters, strict=True)
                ]
            )
        dense = gradients["float16"]
        for name in angles:
            cosine = torch.dot(gradients[name], dense) / (gradients[name].norm() * dense.norm())
            angles[name].append(math.degrees(math.acos(float(cosine.clamp(-1, 1)))))
    return {name: statistics.mean(values) for name, values in angles.items()}


def plot_curves(results: dict, path: Path) -> None:
    """Bytes per token against KL(teacher || decoded) at T = 1 and 2 (dense and top-k), and
    against the teacher mass the draws miss (sampled), one line per vocabulary size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, rows in results["curves"].items():
        for column, key in enumerate(("kl_t1", "kl_t2")):
            for family, marker in (("topk:", "o"), ("float16", "s"), ("int8", "^")):
                chosen = [(e, r) for e, r in rows.items() if e.startswith(family) and key in r]
                if not chosen:
                    continue
                axes[column].plot(
                    [r["bytes_per_token"] for _, r in chosen],
                    [max(r[key], 1e-12) for _, r in chosen],
                    marker=marker,
                    label=f"{family.rstrip(':')} V={name}",
                )
                for encoding, row in chosen:
                    axes[column].annotate(
                        encoding.split(":")[-1] if ":" in encoding else "",
                        (row["bytes_per_token"], max(row[key], 1e-12)),
                        fontsize=7,
                    )
        sampled = [(e, r) for e, r in rows.items() if e.startswith("sampled:")]
        if sampled:
            axes[2].plot(
                [r["bytes_per_token"] for _, r in sampled],
                [r["missing_mass"] for _, r in sampled],
                marker="o",
                label=f"sampled V={name}",
            )
    for column, temperature in enumerate((1, 2)):
        axes[column].set(
            xscale="log",
            yscale="log",
            xlabel="bytes per token on disk",
            ylabel="KL(teacher ‖ decoded), nats",
            title=f"T = {temperature}",
        )
    axes[2].set(
        xlabel="bytes per token on disk",
        ylabel="teacher mass outside the draws",
        title="sampled:S (T = 1)",
    )
    for ax in axes:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def save(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def print_tables(results: dict) -> None:
    print(f"\nteachers: {json.dumps(results.get('teachers', {}))}")
    for name, rows in results.get("curves", {}).items():
        print(f"\nV = {name}\n")
        print("| encoding | B/token | KL(T=1) | KL(T=2) | missing mass | KL(p_hat‖p) |")
        print("|---|---|---|---|---|---|")
        for encoding, row in rows.items():
            cells = [f"{row[k]:.4g}" if k in row else "—" for k in ("kl_t1", "kl_t2")]
            cells += [
                f"{row[k]:.4g}" if k in row else "—" for k in ("missing_mass", "kl_phat_p_t1")
            ]
            print(f"| {encoding} | {row['bytes_per_token']:.1f} | " + " | ".join(cells) + " |")
    students = results.get("students", {})
    if students:
        print("\n| student | B/token | held-out ppl | ECE | grad angle vs float16 |")
        print("|---|---|---|---|---|")
        for name, runs in students.items():
            size = results.get("student_stores", {}).get(name, {}).get("bytes_per_token")
            angles = results.get("angles", {}).get(name)
            print(
                f"| {name} | {'-' if size is None else f'{size:.1f}'} | "
                f"{mean_std([r['ppl'] for r in runs])} | {mean_std([r['ece'] for r in runs])} | "
                f"{'-' if not angles else mean_std(angles) + ' deg'} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--every", type=int, default=30, help="keep every EVERY-th document")
    parser.add_argument("--doc-chars", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--big-vocab", type=int, default=128000)
    parser.add_argument("--teacher", default="2x192", help="teacher LAYERSxWIDTH at 32k")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--big-teacher", default="2x128", help="teacher LAYERSxWIDTH at 128k")
    parser.add_argument("--big-teacher-epochs", type=int, default=1)
    parser.add_argument("--student", default="1x64", help="student LAYERSxWIDTH")
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument(
        "--students-every",
        type=int,
        default=12,
        help="the students train on every N-th of the teacher's training documents",
    )
    parser.add_argument(
        "--curve-docs", type=int, default=4, help="held-out documents the curves are measured on"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--pairs",
        default="topk:8:8,sampled:12",
        help="the encodings the students distill from besides float16 (comma-separated)",
    )
    parser.add_argument("--curve-topk", default="8,16,32,64,128")
    parser.add_argument("--curve-sampled", default="8,16,24,32,48,64")
    parser.add_argument("--angle-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="teacher sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="teacher Adam learning rate")
    parser.add_argument(
        "--student-batch-size",
        type=int,
        default=4,
        help="student sequences per step (small: the students' text is short, so more steps)",
    )
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument(
        "--student-lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="every student's learning-rate schedule (constant: earlier results reproduce)",
    )
    parser.add_argument(
        "--student-warmup-epochs",
        type=float,
        default=0.0,
        help="every student's linear warm-up, in epochs",
    )
    parser.add_argument(
        "--student-max-grad-norm",
        type=float,
        default=0.0,
        help="every student's gradient clipping (0: none, as the earlier results)",
    )
    parser.add_argument(
        "--student-eval-every",
        type=int,
        default=0,
        help="every student's held-out evaluations inside epochs, in steps (0: epochs' ends)",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip-big", action="store_true", help="no 128k teacher or curve")
    parser.add_argument("--retrain", action="store_true", help="train the teachers again")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "command": " ".join(sys.argv),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_at_start": os.getloadavg(),
    }

    def stage(name: str) -> None:
        results.setdefault("stage_s", {})[name] = time.perf_counter() - started
        results["load_now"] = os.getloadavg()
        save(out, results)
        print(f"[{time.perf_counter() - started:7.1f}s] {name}", flush=True)

    texts = build_corpora(out, args, results)
    tokenizer = load_tokenizer(out / "tokenizer-32k")
    for name, spec in texts.items():
        for split in ("train", "test") if name != "curve" else ("train",):
            tokens = build_text_dataset(spec, split=split, tokenizer=tokenizer).num_tokens
            results["corpus"][f"{name}_{split}_tokens_32k"] = tokens
    stage("corpus and tokenizers")

    teachers = {
        "32k": train_teacher(
            out, "32k", texts["stdlib"], args, shape=args.teacher, epochs=args.teacher_epochs
        )
    }
    results.setdefault("teachers", {})["32k"] = evaluate(teachers["32k"], texts["stdlib"])
    stage("teacher 32k")
    data = texts["students"]
    stores = {}
    for encoding in ["float16", *args.pairs.split(",")]:
        path = out / f"train-{encoding.replace(':', '')}.zarr"
        result = dump(teachers["32k"], data, path, encoding, "train", args)
        stores[encoding] = path
        results.setdefault("student_stores", {})[encoding] = {
            "bytes_per_token": result.bytes_per_token,
            "tokens": result.num_tokens,
        }
    stage("student stores")

    student_init = out / "student-init"
    write_config(student_init, load_tokenizer(out / "tokenizer-32k"), args.student, args.max_length)
    common: dict[str, Any] = dict(
        epochs=args.student_epochs,
        batch_size=args.student_batch_size,
        lr=args.student_lr,
        lr_schedule=args.student_lr_schedule,
        warmup_epochs=args.student_warmup_epochs,
        max_grad_norm=args.student_max_grad_norm,
        eval_every=args.student_eval_every,
        device=args.device,
    )
    students: dict[str, list[dict]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        ce_out = out / f"ce-s{seed}"
        ce = train(
            TrainConfig(
                model=f"hf:{student_init}",
                dataset=data,
                seed=seed,
                out=str(ce_out),
                overwrite=True,
                **common,
            )
        )
        students.setdefault("CE only", []).append(
            evaluate(ce_out / "best", texts["stdlib"]) | {"val_ppl_final": ce.final}
        )
        for encoding, store in stores.items():
            run_out = out / f"kd-{encoding.replace(':', '')}-s{seed}"
            run = distill(
                DistillConfig(
                    student=f"hf:{student_init}",
                    cache=str(store),
                    temperature=1.0,
                    alpha=0.5,
                    seed=seed,
                    out=str(run_out),
                    overwrite=True,
                    **common,
                )
            )
            students.setdefault(encoding, []).append(
                evaluate(run_out / "best", texts["stdlib"]) | {"val_ppl_final": run.final}
            )
        angles = gradient_angles(
            ce_out / "best",
            data,
            stores,
            batches=args.angle_batches,
            batch_size=args.student_batch_size,
        )
        for name, angle in angles.items():
            results.setdefault("angles", {}).setdefault(name, []).append(angle)
        results["students"] = students
        stage(f"students seed {seed}")
    if not args.skip_big:
        # Trained on the students' (smaller) text: a 128k head costs 4x the 32k one per token.
        teachers["128k"] = train_teacher(
            out,
            "128k",
            texts["students"],
            args,
            shape=args.big_teacher,
            epochs=args.big_teacher_epochs,
        )
        results["teachers"]["128k"] = evaluate(teachers["128k"], texts["stdlib"])
        stage("teacher 128k")
    for name, teacher in teachers.items():
        results.setdefault("curves", {})[name] = curves(out, name, teacher, texts["curve"], args)
        stage(f"curves {name}")

    results["wall_s"] = time.perf_counter() - started
    save(out, results)
    if results.get("curves"):
        plot_curves(results, out / "lm_stdlib_curves.png")
    print_tables(results)


if __name__ == "__main__":
    main()
