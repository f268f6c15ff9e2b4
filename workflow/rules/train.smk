# Training: one dense model per (dataset, backbone, seed), then every method x
# budget fine-tunes from that same dense checkpoint, so all rows share a baseline.
#
# Resuming: the engine checkpoints every epoch and resumes when re-run, so a
# killed, preempted, requeued or retried job (Slurm --requeue, --retries)
# continues where it stopped. A finished run deletes its checkpoint; a job that
# finds no checkpoint starts from an empty folder. So a re-run caused by a
# changed recipe or a re-trained dense model never resumes stale state.


rule check_data:
    """Before any job or MLflow run on a dataset: ImageNet's folder is where the config says; CIFAR is downloaded once
    (datasets.NAME.data.download) or found under its data.root."""
    output:
        temp("results/data/{dataset}.checked"),
    log:
        "results/logs/{dataset}/check_data.log",
    localrule: True
    conda:
        ENV_FILE
    params:
        data=data_folder,
    script:
        "../scripts/check_data.py"


rule train_dense:
    """The dense baseline: trained with the dataset's recipe, or imported from a pretrained source and evaluated."""
    input:
        data=data_checked,
        parent=parent_input,
    output:
        metrics="runs/{dataset}/{backbone}/dense/seed{seed}/metrics.json",
        model="runs/{dataset}/{backbone}/dense/seed{seed}/model.pt",
        instances="runs/{dataset}/{backbone}/dense/seed{seed}/instances_test.csv",
    log:
        "results/logs/{dataset}/{backbone}/dense/seed{seed}/train.log",
    benchmark:
        "results/benchmarks/{dataset}/{backbone}/dense/seed{seed}/train.tsv"
    conda:
        ENV_FILE
    threads: resource("dense", "threads", 1)
    resources:
        gpu=resource("dense", "gpus", 0),
        mem_mb=resource("dense", "mem_mb", 4000),
        runtime=resource("dense", "runtime", 60),
        slurm_partition=resource("dense", "partition", ""),
        threads_per_process=process_threads("dense"),
        tracking=tracking_train_flag,
    params:
        run=run_folder,
        recipe=dense_args,
        launcher=train_launcher("dense"),
    shell:
        """
        [ -f {params.run}/checkpoint.pt ] || rm -rf {params.run}
        {params.launcher} train --dataset {wildcards.dataset} --backbone {wildcards.backbone} --method dense \
            --seed {wildcards.seed} {params.recipe} --out {params.run} --threads {resources.threads_per_process} \
            {resources.tracking} >{log} 2>&1
        rm -f {params.run}/checkpoint.pt
        """


rule train_method:
    """One method at one budget and seed, fine-tuned from the dense checkpoint of that seed."""
    input:
        dense_model="runs/{dataset}/{backbone}/dense/seed{seed}/model.pt",
        dense_instances="runs/{dataset}/{backbone}/dense/seed{seed}/instances_test.csv",
        parent=parent_input,
    output:
        metrics="runs/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/metrics.json",
        model="runs/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/model.pt",
        instances="runs/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/instances_test.csv",
    log:
        "results/logs/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/train.log",
    benchmark:
        "results/benchmarks/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/train.tsv"
    conda:
        ENV_FILE
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpus", 0),
        mem_mb=resource("train", "mem_mb", 4000),
        runtime=resource("train", "runtime", 60),
        slurm_partition=resource("train", "partition", ""),
        threads_per_process=process_threads("train"),
        tracking=tracking_train_flag,
    params:
        run=run_folder,
        dense=dense_folder,
        recipe=method_args,
        launcher=train_launcher("train"),
    shell:
        """
        [ -f {params.run}/checkpoint.pt ] || rm -rf {params.run}
        {params.launcher} train --dataset {wildcards.dataset} --backbone {wildcards.backbone} {params.recipe} \
            --budget {wildcards.budget} --seed {wildcards.seed} --init-from {params.dense} --out {params.run} \
            --threads {resources.threads_per_process} \
            {resources.tracking} >{log} 2>&1
        rm -f {params.run}/checkpoint.pt
        """


rule train_tuning:
    """One setting of a method's recipe sweep (lr x knob) at one seed, judged on the validation split only.

    --set eval_splits=["val"]: the run evaluates the validation split alone and
    never loads the test split. Not tracked in MLflow: the sweep's record is
    results/{dataset}_tuning.csv. --record-divergence: a setting whose loss
    turns non-finite writes metrics.json with status "diverged" (the tuning
    table lists it and never chooses it) instead of failing the sweep.
    """
    input:
        dense_model="runs/{dataset}/{backbone}/dense/seed{seed}/model.pt",
    output:
        metrics="runs/tuning/{dataset}/{backbone}/{method}-b{budget}/{recipe}/seed{seed}/metrics.json",
    log:
        "results/logs/tuning/{dataset}/{backbone}/{method}-b{budget}/{recipe}/seed{seed}/train.log",
    benchmark:
        "results/benchmarks/tuning/{dataset}/{backbone}/{method}-b{budget}/{recipe}/seed{seed}/train.tsv"
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
        recipe=tuning_args,
        launcher=train_launcher("train"),
    shell:
        """
        [ -f {params.run}/checkpoint.pt ] || rm -rf {params.run}
        {params.launcher} train --dataset {wildcards.dataset} --backbone {wildcards.backbone} {params.recipe} \
            --budget {wildcards.budget} --seed {wildcards.seed} --init-from {params.dense} --out {params.run} \
            --threads {resources.threads_per_process} --set tracking.enabled=false --record-divergence >{log} 2>&1
        rm -f {params.run}/checkpoint.pt
        """
