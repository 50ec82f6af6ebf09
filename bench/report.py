"""Write ``docs/benchmarks.md`` and its plots from ``bench/results/*.json`` (what ``make bench`` last measured).

Only numbers in the result files appear in the page: re-running the benchmarks
and then this script reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS_DIR  # noqa: E402


def load(name: str, results: str) -> list[dict] | None:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def bar_plot(path: str, labels: list[str], values: list[float], ylabel: str, title: str, log: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(labels, values, color=["#888888"] + ["#3b6ea8"] * (len(values) - 1))
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hamming_section(rows: list[dict], img_dir: str, rel: str) -> list[str]:
    base, hashed = rows
    r_key = next(k for k in base if k.startswith("radius") and k.endswith("_ms_per_query"))
    k_key = next(k for k in base if k.startswith("knn") and k.endswith("_ms_per_query"))
    radius, knn = r_key.split("_")[0], k_key.split("_")[0]
    plot = os.path.join(img_dir, "hamming.png")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in ((axes[0], r_key, f"{radius} search"), (axes[1], k_key, f"{knn} search")):
        bars = ax.bar([base["method"], hashed["method"]], [base[key], hashed[key]], color=["#888888", "#3b6ea8"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_ylabel("ms per query")
        ax.set_title(title)
    fig.suptitle(f"{base['codes']:,} {base['bits']}-bit codes, {base['queries']:,} queries")
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    lines = [
        "## Hamming search (`make bench-hamming`)",
        "",
        f"{base['codes']:,} {base['bits']}-bit codes in clusters (as a semantic hash spreads a catalog), "
        f"{base['queries']:,} queries; baseline `IndexBinaryFlat` in the same run. Machine: {base['machine']}, "
        f"faiss on {base['faiss_threads']} threads, commit `{base['commit']}`. "
        "Times are the best of 3 runs.",
        "",
        f"| index | build s | size MB | {radius} ms/query | speed-up | identical to flat | "
        f"{knn} ms/query | speed-up | identical to flat |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"`{row['method']}`", row["build_s"], row["index_mb"]]
        for kind in (radius, knn):
            cells += [row[f"{kind}_ms_per_query"], f"{row[f'{kind}_speedup']}x", row[f"{kind}_identical_to_flat"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    answered = hashed[f"{knn}_answered_from_tables"]
    lines += [
        "",
        f"![Hamming search]({rel}/hamming.png)",
        "",
        f"On average {base['mean_results_within_radius']} codes lie within the radius of a query. "
        f"{answered:.1%} of the {knn} queries were answered from the hash tables; the rest had fewer than k "
        "codes within the exact radius and were scanned.",
        "",
    ]
    return lines


def incremental_section(rows: list[dict], img_dir: str, rel: str) -> list[str]:
    bar_plot(
        os.path.join(img_dir, "incremental.png"),
        [r["method"] for r in rows],
        [r["wall_s"] for r in rows],
        "wall s",
        f"{rows[0]['images']:,} images, {rows[0]['protocol']}",
    )
    lines = [
        "## Nightly reindex (`make bench-incremental`)",
        "",
        f"Machine: {rows[0]['machine']}, runner {rows[0]['runner']}, commit `{rows[0]['commit']}`. "
        "Details and the profile: [results.md](results.md).",
        "",
        "| run | images | read and hashed | decoded | wall s | ratio to full |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['images']:,} | {r.get('hashed', r['images']):,} | {r['decoded']:,} | "
            f"{r['wall_s']} | {r.get('ratio', 1)} |"
        )
    return [*lines, "", f"![Incremental run]({rel}/incremental.png)", ""]


def index_build_section(rows: list[dict], img_dir: str, rel: str) -> list[str]:
    plain, beam = rows
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for row, label, colour in ((plain, "plain faiss, 1 index", "#888888"), (beam, "BuildIndex shards", "#3b6ea8")):
        ax.plot(
            [c["ms_per_query"] for c in row["curve"]],
            [c["recall_at_10"] for c in row["curve"]],
            "o-",
            color=colour,
            label=f"{label} ({row['shards']})",
        )
        for c in row["curve"]:
            ax.annotate(str(c["nprobe"]), (c["ms_per_query"], c["recall_at_10"]), fontsize=7, color=colour)
    ax.axhline(0.95, color="#bb4444", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (batched; labels: nprobe)")
    ax.set_ylabel("recall@10")
    ax.set_title(f"{beam['vectors']:,} x {beam['dim']}, {beam['factory']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(img_dir, "index_build.png"), dpi=110)
    plt.close(fig)
    budget = beam["max_index_memory"]
    lines = [
        "## Index build at scale (`make bench-index`)",
        "",
        f"{beam['vectors']:,} clustered {beam['dim']}-d unit vectors in Parquet feature files; index type chosen "
        f"automatically under `--max_index_memory` {budget / 2**20:.0f} MiB: `{beam['factory']}` "
        f"(estimated {beam['estimated_bytes'] / 2**20:.0f} MiB) and `{beam['binary_factory']}` for the codes. "
        f"Both builds train on {beam['train_sample']:,} vectors and write the float and binary indices; each ran "
        f"in its own process. Machine: {beam['machine']}, faiss on {beam['faiss_threads']} threads, commit "
        f"`{beam['commit']}`.",
        "",
        "| build | shards | wall s | ratio | read s | train s | fill and write s | peak RSS MB | RSS before MB | "
        "index MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stages = " | ".join(str(r.get(k, "")) for k in ("read_s", "train_s", "fill_s"))
        lines.append(
            f"| {r['method']} | {r['shards']} | {r['build_s']} | {r.get('build_time_ratio', 1)} | {stages} | "
            f"{r['peak_rss_mb']:.0f} | {r['base_rss_mb']:.0f} | {r['index_mb']} |"
        )
    lines += [
        "",
        "Stages: BuildIndex's from its Beam timers (`read` includes cutting each file into shard parts and writing "
        "them, `fill and write` reading them back, sorting by item id and writing the id files and checksums); the "
        "script's from its own clock (`fill and write`: add, the binary index, writing both). The rest of "
        "BuildIndex's wall time is building and running the Beam graph, the sample and the manifest.",
    ]
    lines += [
        "",
        f"Recall@10 against exact search (`IndexFlatIP`), {beam['queries']:,} held-out queries searched in one "
        "batch (best of 3); the sharded index is searched through `Searcher.search_vectors`.",
        "",
        "| nprobe | BuildIndex recall@10 | ms/query | plain recall@10 | ms/query |",
        "|---|---|---|---|---|",
    ]
    for b, f in zip(beam["curve"], plain["curve"]):
        lines.append(
            f"| {b['nprobe']} | {b['recall_at_10']} | {b['ms_per_query']} | {f['recall_at_10']} | {f['ms_per_query']} |"
        )
    lines += [
        "",
        f"![Recall vs latency]({rel}/index_build.png)",
        "",
        "Why the two differ. Recall: each shard's `Refine` re-ranks k x 4 candidates, so the shards together "
        "re-rank `shards` times as many as the single index, and the BuildIndex sample is a bottom-k by id hash "
        "where the plain script draws at random. Latency: every shard runs its own coarse quantiser over all "
        "lists, one shard after the other, and the Searcher merges the shards' answers in Python. Peak RSS: "
        "BuildIndex spills each file's rows for each shard to a part file and shuffles only the paths, so it "
        "holds one feature file, or one shard while filling it; the plain script holds every vector at once.",
        "",
    ]
    return lines


def throughput_section(rows: list[dict], img_dir: str, rel: str) -> list[str]:
    embed = [r for r in rows if r["protocol"].startswith("read-decode-embed-write")]
    bar_plot(
        os.path.join(img_dir, "throughput.png"),
        [f"{r['method']}\n{r['images']:,}" for r in embed if r["protocol"] == "read-decode-embed-write"],
        [r["items_per_s"] for r in embed if r["protocol"] == "read-decode-embed-write"],
        "images/s",
        "read, decode, embed, write Parquet",
    )
    lines = [
        "## Embedding throughput (`make bench-throughput`)",
        "",
        f"The Beam pipeline (`--full`, local runner, index build and publish included) against a plain PyTorch "
        f"loop doing the same work with the same bundle, images and batch size; decoding alone against a full "
        f"decode. Best of {rows[0]['repeats']} alternating runs. `-marginal` rows: the rate per extra image "
        f"between the small and the large catalog. Machine: {rows[0]['machine']}, commit `{rows[0]['commit']}`. "
        "Method and fairness: the docstring of `bench/throughput.py`.",
        "",
        "| method | protocol | images | wall s | images/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['protocol']} | {r['images']:,} | {r.get('wall_s', '')} | {r['items_per_s']} | "
            f"{r['ratio']} |"
        )
    return [*lines, "", f"![Throughput]({rel}/throughput.png)", ""]


def serving_section(rows: list[dict], img_dir: str, rel: str) -> list[str]:
    lines = [
        "## Serving load (`make bench-index`)",
        "",
        f"A fresh process opens the generation built above ({rows[0]['vectors']:,} vectors, "
        f"{rows[0]['index_mb']} MB of vector shards) with `Searcher.open` and answers one query. RSS added is "
        "measured from just before the open (after imports) to just after the query; file-backed pages are "
        "page cache shared with other processes. Warm start: the files were just written.",
        "",
        "| open | verify checksums | time to first query s | RSS added MB | anonymous MB | file-backed MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['verify']} | {r['first_query_s']} | {r['rss_added_mb']:.0f} | "
            f"{r['anon_added_mb']:.0f} | {r['file_added_mb']:.0f} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=RESULTS_DIR)
    p.add_argument("--out", default=os.path.join("docs", "benchmarks.md"))
    args = p.parse_args(argv)
    img_dir = os.path.join(os.path.dirname(args.out), "img")
    os.makedirs(img_dir, exist_ok=True)
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench.report` from `bench/results/*.json`; `make bench` runs every benchmark "
        "and then this. Each figure is a ratio against a baseline measured in the same run. The plots are "
        "generated into `docs/img/` (git-ignored): `python -m bench.report` draws them from the committed "
        "results in a second.",
        "",
    ]
    sections = (
        ("index_build", index_build_section),
        ("serving", serving_section),
        ("throughput", throughput_section),
        ("hamming", hamming_section),
        ("incremental", incremental_section),
    )
    for name, section in sections:
        rows = load(name, args.results)
        lines += section(rows, img_dir, "img") if rows else [f"## {name}", "", f"(no `{name}.json` yet)", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    curves = os.path.join(args.results, "hashing-curves.json")
    if os.path.exists(curves):  # the precision curves that docs/results.md's bench-hashing section shows
        from bench.hashing import plot_curves

        with open(curves) as f:
            plot_curves(json.load(f), img_dir)
    print(f"wrote {args.out} and plots in {img_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
