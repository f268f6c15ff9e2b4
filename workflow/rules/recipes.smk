# On-request checks of the recipes (config/README.md): training-time
# augmentation decided on validation like any other knob, and the fine-tuning
# budget's effect on the ranking. Neither is part of the default run. Their
# runs are not tracked in MLflow: the CSVs are their record.


rule train_augment_dense:
    """The dense model of one seed trained with the dataset's augmentation on (validation split only)."""
    output:
        metrics="runs/augment/{dataset}/{backbone}/dense/seed{seed}/metrics.json",
        model="runs/augment/{dataset}/{backbone}/dense/seed{seed}/model.pt",
    log:
        "results/logs/augment/{dataset}/{backbone}/dense/seed{seed}/train.log",
    benchmark:
        "results/benchmarks/augment/{dataset}/{backbone}/dense/seed{seed}/train.tsv"
    conda:
        ENV_FILE
    threads: resource("dense", "threads", 1)
    resources:
        gpu=resource("dense", "gpus", 0),
        mem_mb=resource("dense", "mem_mb", 4000),
        runtime=resource("dense", "runtime", 60),
        slurm_partition=resource("dense", "partition", ""),
        threads_per_process=process_threads("dense"),
    params:
        run=run_folder,
        recipe=augment_dense_args,
        launcher=train_launcher("dense"),
    shell:
        """
        [ -f {params.run}/checkpoint.pt ] || rm -rf {params.run}
        {params.launcher} train --dataset {wildcards.dataset} --backbone {wildcards.backbone} --method dense \
            --seed {wildcards.seed} {params.recipe} --out {params.run} --threads {resources.threads_per_process} \
            --set tracking.enabled=false >{log} 2>&1
        rm -f {params.run}/checkpoint.pt
        """


rule train_augment_method:
    """One method at its recipe, augmentation on, fine-tuned from the augmented dense model of its seed."""
    input:
        dense_model="runs/augment/{dataset}/{backbone}/dense/seed{seed}/model.pt",
    output:
        metrics="runs/augment/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/metrics.json",
    log:
        "results/logs/augment/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/train.log",
    benchmark:
        "results/benchmarks/augment/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/train.tsv"
    conda:
        ENV_FILE
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpus", 0),
        mem_mb=resource("train", "mem_mb", 4000),
        runtime=resource("train", "runtime", 60),
        slurm_partition=resource("train", "partition", ""),
        threads_per_process=process_threads("train"),
    params:
        run=run_folder,
        dense=dense_folder,
        recipe=augment_method_args,
        launcher=train_launcher("train"),
    shell:
        """
        [ -f {params.run}/checkpoint.pt ] || rm -rf {params.run}
        {params.launcher} train --dataset {wildcards.dataset} --backbone {wildcards.backbone} {params.recipe} \
            --budget {wildcards.budget} --seed {wildcards.seed} --init-from {params.dense} --out {params.run} \
            --threads {resources.threads_per_process} --set tracking.enabled=false >{log} 2>&1
        rm -f {params.run}/checkpoint.pt
        """


rule augmentation_table:
    """Validation top-1 of dense and every method with and without the augmentation, per seed and paired."""
    input:
        metrics=metrics_of(augment_dirs),
    output:
        report(
            "results/{dataset}_augmentation.csv",
            caption="../report/augmentation.rst",
            category="Tables",
            subcategory="{dataset}",
        ),
    log:
        "results/logs/{dataset}/augmentation_table.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    script:
        "../scripts/augmentation_table.py"


rule train_budget:
    """One method at its recipe with another number of fine-tuning epochs (the training-budget curve)."""
    input:
        dense_model="runs/{dataset}/{backbone}/dense/seed{seed}/model.pt",
    output:
        metrics="runs/budget/{dataset}/{backbone}/{method}-b{budget}/e{epochs}/seed{seed}/metrics.json",
    log:
        "results/logs/budget/{dataset}/{backbone}/{method}-b{budget}/e{epochs}/seed{seed}/train.log",
    benchmark:
        "results/benchmarks/budget/{dataset}/{backbone}/{method}-b{budget}/e{epochs}/seed{seed}/train.tsv"
    conda:
        ENV_FILE
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpus", 0),
        mem_mb=resource("train", "mem_mb", 4000),
        runtime=resource("train", "runtime", 60),
        slurm_partition=resource("train", "partition", ""),
        threads_per_process=process_threads("train"),
    params:
        run=run_folder,
        dense=dense_folder,
        recipe=budget_curve_args,
        launcher=train_launcher("train"),
    shell:
        """
        [ -f {params.run}/checkpoint.pt ] || rm -rf {params.run}
        {params.launcher} train --dataset {wildcards.dataset} --backbone {wildcards.backbone} {params.recipe} \
            --budget {wildcards.budget} --seed {wildcards.seed} --init-from {params.dense} --out {params.run} \
            --threads {resources.threads_per_process} --set tracking.enabled=false >{log} 2>&1
        rm -f {params.run}/checkpoint.pt
        """


rule training_budget_curve:
    """Test and validation top-1 of every curve method at each fine-tuning budget (mean +- std over seeds), and
    the plot."""
    input:
        metrics=metrics_of(budget_curve_dirs),
    output:
        csv=report(
            "results/{dataset}_training_budget.csv",
            caption="../report/training_budget.rst",
            category="Tables",
            subcategory="{dataset}",
        ),
        png=report(
            "results/{dataset}_training_budget.png",
            caption="../report/training_budget.rst",
            category="Plots",
            subcategory="{dataset}",
        ),
    log:
        "results/logs/{dataset}/training_budget_curve.log",
    localrule: True
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb", 2000),
        runtime=resource("report", "runtime", 30),
    script:
        "../scripts/training_budget.py"
