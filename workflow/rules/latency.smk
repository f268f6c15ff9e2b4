# Latency per hardware profile: the deployed model against the dense one, in
# the same process (manidp latency). A profile whose device is absent records
# "unavailable" with the reason; on Slurm a cuda profile requests a GPU.


rule latency:
    """Batch latency of one trained run on one hardware profile, dense vs deployed."""
    input:
        model="runs/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/model.pt",
        dense_model="runs/{dataset}/{backbone}/dense/seed{seed}/model.pt",
    output:
        "runs/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/latency_{profile}.json",
    log:
        "results/logs/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/latency_{profile}.log",
    benchmark:
        "results/benchmarks/{dataset}/{backbone}/{method}-b{budget}/seed{seed}/latency_{profile}.tsv"
    conda:
        ENV_FILE
    # The profile's threads, reserved whole so concurrent jobs do not skew the timing.
    threads: lambda wc: profile_of(wc)["threads"]
    resources:
        gpu=latency_gpus,
        mem_mb=resource("latency", "mem_mb", 4000),
        runtime=resource("latency", "runtime", 30),
        slurm_partition=resource("latency", "partition", ""),
    params:
        run=measured_folder,
        dense=dense_folder,
        profile=latency_args,
    shell:
        "manidp latency {params.run} --dense {params.dense} {params.profile} --out {output} > {log} 2>&1"
