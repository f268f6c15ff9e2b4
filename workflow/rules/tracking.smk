# MLflow bookkeeping: the store once, a parent run per (dataset, backbone), a
# summary run per dataset. All light, so they run on the submitting machine.
localrules: tracking_store, tracking_parent, tracking_summary


rule tracking_store:
    """Create the MLflow store (and one experiment per dataset) before any job opens it."""
    output:
        "results/tracking/store.txt",
    log:
        "results/logs/tracking_store.log",
    params:
        experiments=" ".join(f"--experiment {shlex.quote(ds)}" for ds in config["datasets"]),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "manidp tracking init {params.experiments} > {output} 2> {log}"


rule tracking_parent:
    """Find or create the parent run that groups one (dataset, backbone)'s runs."""
    input:
        store_input,
    output:
        "results/tracking/{dataset}/{backbone}/parent_run.txt",
    log:
        "results/logs/{dataset}/{backbone}/tracking_parent.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "manidp tracking-parent {TRACKING_SWITCH} --dataset {wildcards.dataset} --backbone {wildcards.backbone} "
        "--out {output} > {log} 2>&1"


rule tracking_summary:
    """One summary run per dataset: tables and plots as artifacts, latency logged into each run."""
    input:
        unpack(lambda wc: report_inputs(wc.dataset)),
        table="results/{dataset}_table.csv",
        table_md="results/{dataset}_table.md",
        table_tex="results/{dataset}_table.tex",
        pareto="results/{dataset}_pareto.png",
        difficulty="results/{dataset}_macs_vs_difficulty.png",
    output:
        "results/tracking/{dataset}/summary_run.txt",
    log:
        "results/logs/{dataset}/tracking_summary.log",
    params:
        runs=lambda wc: " ".join(all_run_dirs(wc.dataset)),
        profiles=lambda wc: " ".join(profiles(wc.dataset)),
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    shell:
        "manidp tracking-summary {TRACKING_SWITCH} --dataset {wildcards.dataset} --runs {params.runs} "
        "--profiles {params.profiles} --artifact {input.table} {input.table_md} {input.table_tex} "
        "{input.pareto} {input.difficulty} --out {output} > {log} 2>&1"
