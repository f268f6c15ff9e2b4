# Tables and plots per dataset, built from the run files alone (never from the
# tracking store), and the HTML report after a successful run.
localrules: table, plot


rule table:
    """The paper-layout table: ours (mean +- std over seeds) beside the paper's reported rows."""
    input:
        unpack(lambda wc: report_inputs(wc.dataset)),
    output:
        csv=report("results/{dataset}_table.csv", caption="../report/table.rst", category="Tables",
                   subcategory="{dataset}"),
        md="results/{dataset}_table.md",
        tex="results/{dataset}_table.tex",
    log:
        "results/logs/{dataset}/table.log",
    params:
        runs=lambda wc: " ".join(all_run_dirs(wc.dataset)),
        profiles=lambda wc: " ".join(profiles(wc.dataset)),
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    shell:
        "manidp table --dataset {wildcards.dataset} --runs {params.runs} --profiles {params.profiles} "
        "--out {output.csv} > {log} 2>&1"


rule plot:
    """Accuracy vs MACs (error bars over seeds, paper points marked) and per-instance MACs vs difficulty."""
    input:
        unpack(lambda wc: report_inputs(wc.dataset)),
    output:
        pareto=report("results/{dataset}_pareto.png", caption="../report/pareto.rst", category="Plots",
                      subcategory="{dataset}"),
        difficulty=report("results/{dataset}_macs_vs_difficulty.png", caption="../report/difficulty.rst",
                          category="Plots", subcategory="{dataset}"),
    log:
        "results/logs/{dataset}/plot.log",
    params:
        runs=lambda wc: " ".join(all_run_dirs(wc.dataset)),
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    shell:
        "manidp plot --dataset {wildcards.dataset} --runs {params.runs} --pareto {output.pareto} "
        "--difficulty {output.difficulty} > {log} 2>&1"


onsuccess:
    write_report(config.get("report"))
