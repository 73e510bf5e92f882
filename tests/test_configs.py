"""Every config group option composes, and every ``_target_`` resolves and accepts its keyword arguments.

Nodes that only need local objects are really instantiated; nodes that would download (hub models) or need a
GPU are checked by resolving the target and binding the config's kwargs to its signature.
"""

from __future__ import annotations

import inspect

import pytest
from hydra._internal.utils import _locate
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from me5.app.pipeline import build_loss, validate_config
from me5.errors import ConfigError
from tests.helpers import compose_cfg, group_options

# arguments the app passes at run time, not in the config
RUNTIME_KWARGS = {"encoder", "loss", "tokenizer", "evaluators", "save_dir", "run_name", "stage", "hparams",
                  "max_steps", "logger", "callbacks", "default_root_dir", "val_check_interval", "limit_val_batches",
                  "prompts", "batch_plan", "dirpath", "run_config", "meta"}


def _check_targets(node, path="") -> int:
    """Resolve every _target_ and bind its kwargs; returns how many targets were checked."""
    if OmegaConf.is_config(node):  # plain containers: fields left ??? (bound at run time) stay strings
        node = OmegaConf.to_container(node, resolve=False, throw_on_missing=False)
    n = 0
    if isinstance(node, dict):
        if "_target_" in node:
            fn = _locate(node["_target_"])
            kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
            sig = inspect.signature(fn)
            try:
                sig.bind_partial(**kwargs)
            except TypeError as err:
                raise AssertionError(f"{path}: {node['_target_']} does not accept {sorted(kwargs)}: {err}") from err
            n += 1
        for k, v in node.items():
            n += _check_targets(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            n += _check_targets(v, f"{path}[{i}]")
    return n


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "eval", "prompts", "callbacks", "experiment"])
def test_every_option_composes_and_targets_resolve(group, tmp_path):
    for option in group_options(group):
        cfg = compose_cfg([f"{group}={option}"], tmp_path=tmp_path)
        OmegaConf.resolve(cfg) if group != "experiment" else None
        assert _check_targets(cfg) > 5, f"{group}={option}"
        if option == "files":  # the user's paths are mandatory: validation names them
            with pytest.raises(ConfigError, match=r"data\.pretrain\.path"):
                validate_config(cfg)
            cfg = compose_cfg([f"{group}={option}", "data.pretrain.path=/x.jsonl", "data.finetune.path=/y.jsonl"],
                              tmp_path=tmp_path)
        if option == "me5_large_instruct":  # refuses to start without the mE5-large stage-1 weights
            with pytest.raises(ConfigError, match=r"'start_from'.*must be given"):
                validate_config(cfg)
            cfg = compose_cfg([f"{group}={option}", "start_from=/runs/large/export/pretrain"], tmp_path=tmp_path)
            assert cfg.stages.finetune.init_from == "/runs/large/export/pretrain"
        validate_config(cfg)


@pytest.mark.parametrize("option", group_options("data"))
def test_data_mixtures_instantiate(option, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    cfg = compose_cfg([f"data={option}", f"data.pretrain.path={tmp_path / 'x.jsonl'}",
                       f"data.finetune.path={tmp_path / 'x.jsonl'}"] if option == "files" else [f"data={option}"],
                      tmp_path=tmp_path)
    for stage in ("pretrain", "finetune"):
        dm = instantiate(cfg.data[stage])
        weights = dm.weights()
        assert set(weights) == set(dm.sources()) and sum(weights.values()) > 0


def test_paper_mixture_weights_are_tables_1_and_2(tmp_path):
    cfg = compose_cfg(["data=paper"], tmp_path=tmp_path)
    t1 = dict(cfg.data.pretrain.weights)
    assert t1 == {"wikipedia": 150, "mc4": 160, "cc_news": 160, "nllb": 160, "reddit": 160, "s2orc": 25,
                  "s2orc_citations": 25, "stackexchange": 50, "xp3": 80, "sbert": 10}
    assert sum(t1.values()) == 980  # "about 1B" sampled pairs (millions)
    t2 = dict(cfg.data.finetune.weights)
    assert sum(t2.values()) == pytest.approx(1596, abs=0.5) and t2["msmarco_passage"] == 500
    assert sum(v for k, v in t2.items() if k.startswith("miracl_")) == pytest.approx(40, abs=0.5)
    assert t2["nq"] + t2["triviaqa"] + t2["squad"] == 220
    # every source is its own class (a small DataModule per source)
    targets = {s._target_ for s in cfg.data.pretrain.sources.values()} | {s._target_ for s in cfg.data.finetune.sources.values()}
    assert len(targets) >= 22


@pytest.mark.parametrize("option", ["tiny", "small", "base", "large"])
def test_model_group_holds_the_encoder_and_the_experiments_the_paper_values(option, tmp_path):
    """The model group holds the encoder and tokenizer only; the paper's per-size stage values come from
    experiment/me5_<size>.yaml (the shared recipe plus the size's learning rates)."""
    cfg = compose_cfg([f"model={option}"], tmp_path=tmp_path)
    assert set(cfg.model) == {"name", "tokenizer", "encoder"}
    expected = {"small": (3e-4, 3e-5), "base": (2e-4, 2e-5), "large": (1e-4, 1e-5)}
    if option in expected:
        cfg = compose_cfg([f"experiment=me5_{option}"], tmp_path=tmp_path)
        assert cfg.model.name == option
        assert (cfg.stages.pretrain.lr, cfg.stages.finetune.lr) == expected[option]
        assert cfg.stages.pretrain.global_batch_size == 32768 and cfg.stages.finetune.global_batch_size == 512
        assert (cfg.stages.pretrain.max_steps, cfg.stages.finetune.max_steps) == (30000, 6250)
        assert cfg.stages.pretrain.module.optimizer.lr == expected[option][0]
    backbone = {"small": "microsoft/Multilingual-MiniLM-L12-H384", "base": "FacebookAI/xlm-roberta-base",
                "large": "FacebookAI/xlm-roberta-large"}
    if option in backbone:
        assert cfg.model.encoder.name_or_path == backbone[option]
    assert cfg.prompts.style == "e5"


def test_instruct_experiment_is_large_with_the_instruct_policy(tmp_path):
    cfg = compose_cfg(["experiment=me5_large_instruct"], tmp_path=tmp_path)
    from me5.app.pipeline import selected_stages

    assert cfg.prompts.style == "instruct" and cfg.model.name == "large" and selected_stages(cfg) == ["finetune"]
    assert (cfg.stages.finetune.lr, cfg.stages.finetune.global_batch_size) == (1e-5, 512)  # "same as mE5-large"


def test_cpu_trainer_and_logger_instantiate(tmp_path):
    cfg = compose_cfg(["logger=csv"], tmp_path=tmp_path)
    trainer = instantiate(cfg.trainer, max_steps=1, logger=False, enable_progress_bar=False)
    assert trainer.max_steps == 1
    logger = instantiate(cfg.logger, save_dir=str(tmp_path), run_name="x", stage="pretrain", hparams={"a": 1})
    assert logger.log_dir.endswith("pretrain")
    assert instantiate(compose_cfg(["logger=none"], tmp_path=tmp_path).logger, save_dir="x", run_name="x", stage="s") is False


def test_ddp_strategy_instantiates(tmp_path):
    cfg = compose_cfg(["trainer=ddp"], tmp_path=tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "AllReduceDDPStrategy"


def test_loss_terms_per_stage(tmp_path):
    cfg = compose_cfg([], tmp_path=tmp_path)
    specs = validate_config(cfg)
    pre, fin = build_loss(cfg, specs["pretrain"]), build_loss(cfg, specs["finetune"])
    assert set(pre.terms) == {"infonce"} and set(fin.terms) == {"infonce", "kd"}
    assert fin.weights == {"infonce": 0.2, "kd": 1.0}
    for overrides in (["stages.finetune.loss_weights.kd=0", "stages.finetune.loss_weights.infonce=1.0"],
                      ["experiment=ablation_no_kd"]):
        only = compose_cfg(overrides, tmp_path=tmp_path)
        loss = build_loss(only, validate_config(only)["finetune"])
        assert set(loss.terms) == {"infonce"} and loss.weights == {"infonce": 1.0} and not loss.requires_teacher


def test_temperature_override_reaches_every_term(tmp_path):
    cfg = compose_cfg(["loss.temperature=0.05"], tmp_path=tmp_path)
    assert cfg.loss.terms.infonce.temperature == 0.05 and cfg.loss.terms.kd.temperature == 0.05


def test_unknown_override_and_model_fail_with_the_name(tmp_path):
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_cfg(["+x=1", "no_such_key=3"], tmp_path=tmp_path)
    with pytest.raises(ConfigCompositionException, match="huge"):
        compose_cfg(["model=huge"], tmp_path=tmp_path)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["stages.pretrain.per_device_batch_size=128"], "stages.pretrain.per_device_batch_size"),
        (["stages.pretrain.per_device_batch_size=48"], "stages.pretrain.per_device_batch_size"),
        (["stages.pretrain.chunk_rows=8", "stages.pretrain.chunk_tokens=512"], "stages.pretrain.chunk_tokens"),
        (["stages.pretrain.chunk_rows=65"], "stages.pretrain.chunk_rows"),
        (["stages.pretrain.warmup_steps=301"], "stages.pretrain.warmup_steps"),
        (["stages.finetune.max_steps=5"], "stages.finetune.warmup_steps"),
        (["stages.pretrain.lr=0"], "stages.pretrain.lr"),
        (["+stages.pretrain.module.scheduler.total_steps=10"], "stages.pretrain.module.scheduler.total_steps"),
        (["prompts.style=e6"], "prompts.style"),
        (["loss.temperature=0"], "loss.temperature"),
        (["+stages.pretrain.loss_weights.distill=1.0"], "stages.pretrain.loss_weights.distill"),
        (["stages.pretrain.loss_weights.infonce=0"], "stages.pretrain.loss_weights"),
        (["stages.finetune.loss_weights.kd=-1"], "stages.finetune.loss_weights.kd"),
        (["loss=[infonce]"], "stages.finetune.loss_weights.kd"),
        (["stages.pretrain.name=finetune"], "stages.pretrain.name"),
        (["+stages.stage3.lr=1"], "stages.stage3"),
        (["stages.finetune.max_steps=0"], "stages.finetune.max_steps"),
    ],
)
def test_contradictory_overrides_name_the_field(overrides, field, tmp_path):
    cfg = compose_cfg(overrides, tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("*", r"\*")):
        validate_config(cfg)


def test_batch_must_divide_world_size(tmp_path):
    def plan(cfg, world):
        return validate_config(cfg)["pretrain"].batch_plan(world)

    cfg = compose_cfg([], tmp_path=tmp_path)
    specs = validate_config(cfg)
    assert (specs["pretrain"].batch_plan(2).per_device_batch_size, specs["pretrain"].batch_plan(2).rank_slice(1)) == \
        (32, slice(32, 64))
    assert specs["finetune"].batch_plan(2).where == "stages.finetune"
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.global_batch_size"):
        plan(cfg, 3)
    cfg = compose_cfg(["stages.pretrain.per_device_batch_size=32"], tmp_path=tmp_path)
    assert plan(cfg, 2).per_device_batch_size == 32
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.per_device_batch_size"):
        plan(cfg, 4)
    cfg = compose_cfg(["stages.pretrain.chunk_rows=32"], tmp_path=tmp_path)
    assert plan(cfg, 2).chunk_rows == 32
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.chunk_rows"):  # 32 > 64 / 4 devices
        plan(cfg, 4)


def test_launchers_compose(tmp_path):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    import me5.app.resolvers  # noqa: F401 -- ${me5.slurm_count:...}
    from tests.helpers import CONF

    expected = {"slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                "local": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    for launcher, target in expected.items():
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = hcompose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_ == target, launcher
        assert _locate(target).__name__ == target.rsplit(".", 1)[1]  # the plugin is installed
    # the slurm launcher reads its task counts from the trainer group (never written twice)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hcompose("config", overrides=["hydra/launcher=slurm", "trainer.devices=8", "trainer.num_nodes=2"],
                       return_hydra_config=True)
    assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.nodes) == (8, 2)


def test_the_documented_source_fields_are_plain_overrides(tmp_path):
    """The fields the docs tell a user to set exist in the configs (no ``+`` needed): every option of
    ``data=files`` and every stage-1 source's ``data_files`` / ``max_chars`` of ``data=paper``, and the NLI
    source's own negative count."""
    files = ["strict=false", "max_chars=4096", "long_texts=drop", "lang=de", "symmetric=true", "task=nq",
             "instruction=x", "data_files=[a.jsonl]", "max_examples=10", "n_negatives=1"]
    cfg = compose_cfg(["data=files", *[f"data.pretrain.{f}" for f in files]], tmp_path=tmp_path)
    assert cfg.data.pretrain.strict is False and cfg.data.pretrain.n_negatives == 1
    sig = inspect.signature(_locate(cfg.data.pretrain._target_))
    assert {f.split("=")[0] for f in files} <= set(sig.parameters)  # each reaches the constructor
    paper = compose_cfg(["data=paper"], tmp_path=tmp_path)
    over = [f"data.pretrain.sources.{name}.data_files=[x.jsonl]" for name in paper.data.pretrain.sources]
    cfg = compose_cfg(["data=paper", *over, "data.finetune.sources.nli.n_negatives=1"], tmp_path=tmp_path)
    assert all(list(src.data_files) == ["x.jsonl"] for src in cfg.data.pretrain.sources.values())
    assert cfg.data.finetune.sources.nli.n_negatives == 1
    with pytest.raises(ConfigCompositionException):  # the check can fail: an undeclared field needs a +
        compose_cfg(["data=files", "data.pretrain.no_such_field=1"], tmp_path=tmp_path)
