# Tables and plots per dataset, built from the run files alone (never from the
# tracking store). The HTML report is Snakemake's own (`report-after-run` in
# the profiles, or `snakemake --report results/report.html`).


rule table:
    """The paper-layout table (mean +- std over seeds) beside the paper's reported rows, and one row per run."""
    input:
        unpack(report_inputs),
    output:
        csv="results/{dataset}_table.csv",
        md="results/{dataset}_table.md",
        tex="results/{dataset}_table.tex",
        full="results/{dataset}_table_full.md",
        html=report(
            "results/{dataset}_table.html",
            caption="../report/table.rst",
            category="Tables",
            subcategory="{dataset}",
        ),
        per_seed=report(
            "results/{dataset}_per_seed.csv",
            caption="../report/per_seed.rst",
            category="Tables",
            subcategory="{dataset}",
        ),
    log:
        "results/logs/{dataset}/table.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    params:
        runs=lambda wc: " ".join(main_dirs(wc)),
        profiles=lambda wc: " ".join(PLAN.profiles(wc.dataset)),
    shell:
        "manidp table --dataset {wildcards.dataset} --runs {params.runs} --profiles {params.profiles} "
        "--out {output.csv} --per-seed {output.per_seed} > {log} 2>&1"


rule plot:
    """Accuracy vs MACs and vs measured speed-up (error bars over seeds, paper points marked), MACs vs difficulty."""
    input:
        unpack(report_inputs),
    output:
        pareto=report(
            "results/{dataset}_pareto.png",
            caption="../report/pareto.rst",
            category="Plots",
            subcategory="{dataset}",
        ),
        difficulty=report(
            "results/{dataset}_macs_vs_difficulty.png",
            caption="../report/difficulty.rst",
            category="Plots",
            subcategory="{dataset}",
        ),
        speedup=report(
            "results/{dataset}_speedup.png",
            caption="../report/speedup.rst",
            category="Plots",
            subcategory="{dataset}",
        ),
    log:
        "results/logs/{dataset}/plot.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    params:
        runs=lambda wc: " ".join(main_dirs(wc)),
    shell:
        "manidp plot --dataset {wildcards.dataset} --runs {params.runs} --pareto {output.pareto} "
        "--difficulty {output.difficulty} --speedup {output.speedup} > {log} 2>&1"


rule ablation_table:
    """The reference method beside its ablations (same budgets, seeds and dense checkpoints); on request only."""
    input:
        unpack(ablation_inputs),
    output:
        csv="results/{dataset}_ablations.csv",
        md="results/{dataset}_ablations.md",
        tex="results/{dataset}_ablations.tex",
        full="results/{dataset}_ablations_full.md",
        html=report(
            "results/{dataset}_ablations.html",
            caption="../report/ablations.rst",
            category="Tables",
            subcategory="{dataset}",
        ),
    log:
        "results/logs/{dataset}/ablation_table.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    params:
        runs=lambda wc: " ".join(ablation_dirs(wc)),
    shell:
        "manidp table --dataset {wildcards.dataset} --runs {params.runs} --profiles --out {output.csv} > {log} 2>&1"


rule tuning_table:
    """The recipe sweep on the validation split: every setting's mean +- std over seeds, and each method's choice."""
    input:
        metrics=metrics_of(tuning_dirs),
    output:
        csv="results/{dataset}_tuning.csv",
        html=report(
            "results/{dataset}_tuning.html",
            caption="../report/tuning.rst",
            category="Tables",
            subcategory="{dataset}",
        ),
    log:
        "results/logs/{dataset}/tuning_table.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    params:
        runs=lambda wc: " ".join(tuning_dirs(wc)),
    shell:
        "manidp tuning-table --runs {params.runs} --out {output.csv} > {log} 2>&1"


rule dataset_all:
    """Everything for one dataset (tables, plots, MLflow summary, models): `snakemake results/{dataset}_all.txt`."""
    input:
        dataset_targets,
    output:
        "results/{dataset}_all.txt",
    log:
        "results/logs/{dataset}/dataset_all.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    shell:
        "printf '%s\\n' {input} > {output} 2> {log}"
