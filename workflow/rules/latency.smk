# Latency per hardware profile: each deployed model against the dense one, in
# the same process (manidp latency). One job per (dataset, backbone, seed,
# profile) times every method run of that seed, one after the other: the
# start-up (torch, timm) is paid once, not once per run, and the profile's
# cores stay reserved for the whole job. A profile whose device is absent
# records "unavailable" with the reason, not as final: when the device
# appears, the job re-runs (params.device, see profile_device); on Slurm a
# cuda profile requests a GPU.
#
# Snakemake needs each rule's outputs as fixed patterns, and the runs of a
# seed depend on the dataset's methods and budgets: so one rule per
# (dataset, backbone), named latency_<dataset>_<backbone>.


for _ds, _backbone in PLAN.latency_groups():

    rule:
        name:
            latency_rule_name(_ds, _backbone)
        input:
            models=latency_models(_ds, _backbone),
            dense_model="runs/{dataset}/{backbone}/dense/seed{seed}/model.pt",
        output:
            latency_outputs(_ds, _backbone),
        log:
            "results/logs/{dataset}/{backbone}/latency/seed{seed}_{profile}.log",
        benchmark:
            "results/benchmarks/{dataset}/{backbone}/latency/seed{seed}_{profile}.tsv"
        wildcard_constraints:
            **latency_constraints(_ds, _backbone),
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
            runs=measured_folders,
            dense=dense_folder,
            profile=latency_args,
            device=profile_device,
        shell:
            "manidp latency {params.runs} --dense {params.dense} {params.profile} "
            "--out-name latency_{wildcards.profile}.json > {log} 2>&1"
