# MLflow bookkeeping: the store once, a parent run per (dataset, backbone), a
# summary run per dataset. All light, so they run on the submitting machine.
# A dataset's experiment is created by its first parent run: only datasets
# that run get one.


rule tracking_store:
    """Create the MLflow store before any job opens it (a fresh sqlite store races when opened in parallel)."""
    output:
        "results/tracking/store.txt",
    log:
        "results/logs/tracking_store.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "manidp tracking init > {output} 2> {log}"


rule tracking_parent:
    """Find or create the parent run that groups one (dataset, backbone)'s runs (and the dataset's experiment)."""
    input:
        store=store_input,
        data=data_checked,
    output:
        "results/tracking/{dataset}/{backbone}/parent_run.txt",
    log:
        "results/logs/{dataset}/{backbone}/tracking_parent.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        tracking=tracking_command_flag,
    shell:
        "manidp tracking-parent {resources.tracking} --dataset {wildcards.dataset} --backbone {wildcards.backbone} "
        "--out {output} > {log} 2>&1"


rule tracking_summary:
    """One summary run per dataset: tables and plots as artifacts, latency logged into each run."""
    input:
        unpack(report_inputs),
        table="results/{dataset}_table.csv",
        table_md="results/{dataset}_table.md",
        table_tex="results/{dataset}_table.tex",
        table_full="results/{dataset}_table_full.md",
        table_html="results/{dataset}_table.html",
        per_seed="results/{dataset}_per_seed.csv",
        pareto="results/{dataset}_pareto.png",
        difficulty="results/{dataset}_macs_vs_difficulty.png",
        speedup="results/{dataset}_speedup.png",
    output:
        "results/tracking/{dataset}/summary_run.txt",
    log:
        "results/logs/{dataset}/tracking_summary.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
        tracking=tracking_command_flag,
    params:
        runs=lambda wc: " ".join(main_dirs(wc)),
        profiles=lambda wc: " ".join(PLAN.profiles(wc.dataset)),
    shell:
        "manidp tracking-summary {resources.tracking} --dataset {wildcards.dataset} --runs {params.runs} "
        "--profiles {params.profiles} --artifact {input.table} {input.table_md} {input.table_tex} {input.table_full} "
        "{input.table_html} "
        "{input.per_seed} {input.pareto} {input.difficulty} {input.speedup} --out {output} > {log} 2>&1"
