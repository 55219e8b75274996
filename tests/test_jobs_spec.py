"""OpenAI job fields and Tunery's extensions, mapped to the `TuneryConfig` a worker trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunery.jobs.spec import InvalidRequest, base_display, build_config, model_name, parse_request
from tunery.jobs.tables import Job


def _config(body: dict, **job_fields):
    fields = parse_request(body)
    ext = {**fields["tunery"], "base_spec": "smollm2-135m", **job_fields.pop("ext", {})}
    job = Job(
        id="ftjob-1",
        owner="key_1",
        model="smollm2-135m",
        seed=5,
        hyperparameters=fields["hyperparameters"],
        method=fields["method"],
        tunery=ext,
        run_dir="jobs/ftjob-1",
        resume=job_fields.pop("resume", False),
    )
    return fields, build_config(job, Path("/data"), Path("/data/files/file-a"), None)


def test_supervised_defaults_and_openai_hyperparameters():
    fields, cfg = _config(
        {"hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}
    )
    assert (cfg.method, cfg.objective, cfg.seed) == ("lora", "sft", 5)
    assert cfg.hyperparameters.n_epochs == 2 and cfg.hyperparameters.batch_size == "auto"
    assert cfg.hyperparameters.learning_rate_multiplier == 0.5
    assert cfg.output == "/data/jobs/ftjob-1" and cfg.data.train == "/data/files/file-a"
    assert fields["method"] == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}
        },
    }


def test_dpo_method_maps_to_dpo_objective_with_beta():
    fields, cfg = _config(
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 1}}}}
    )
    assert cfg.objective == "dpo" and cfg.objective_options.beta == 0.3
    assert cfg.hyperparameters.n_epochs == 1 and fields["hyperparameters"]["beta"] == 0.3


def test_tunery_extensions_any_registered_method_and_objective():
    _, cfg = _config(
        {
            "tunery": {
                "method": "lora",
                "objective": "orpo",
                "lora": {"r": 4},
                "hyperparameters": {"max_steps": 3, "save_steps": 1},
            }
        }
    )
    assert cfg.objective == "orpo" and cfg.method_options.r == 4
    assert cfg.hyperparameters.max_steps == 3 and cfg.hyperparameters.save_steps == 1
    _, cfg = _config({"method_name": "full", "objective": "sft"})
    assert cfg.method == "full"


def test_continue_from_ft_model_and_resume():
    _, cfg = _config({}, ext={"adapter": "jobs/ftjob-0/model"}, resume=True)
    assert cfg.init_from == "/data/jobs/ftjob-0/model" and cfg.resume is True


@pytest.mark.parametrize(
    "body, param",
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 512}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"warmup": 3}}, "hyperparameters"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}}},
            "method.dpo.hyperparameters.beta",
        ),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"tunery": {"objective": "nope"}}, "tunery.objective"),
        ({"tunery": {"method": "nope"}}, "tunery.method"),
        ({"tunery": {"qlora": {"r": 2}}}, "tunery.qlora"),
    ],
)
def test_invalid_requests_name_the_field(body, param):
    with pytest.raises(InvalidRequest) as err:
        parse_request(body)
    assert err.value.param == param


def test_bad_option_values_fail_before_training():
    with pytest.raises(InvalidRequest) as err:
        _config({"tunery": {"lora": {"r": 0}}})
    assert "lora" in err.value.param


def test_model_names():
    name = model_name("/models/my-llama/", "Alice Smith", None)
    assert name.startswith("ft:my-llama:alice-smith::") and len(name.rsplit(":", 1)[1]) == 8
    assert model_name("smollm2-135m", "admin", "v2").startswith("ft:smollm2-135m:admin:v2:")
    assert base_display("org/model:tag") == "model-tag"


@pytest.mark.parametrize("objective", ["grpo", "rlaif"])
def test_server_never_allows_custom_reward_code(objective):
    rewards = [{"name": "contains", "word": "blue"}]
    body = {
        "tunery": {
            "objective": objective,
            objective: {"allow_custom_rewards": True, "reward_functions": rewards},
        }
    }
    _, cfg = _config(body)
    assert cfg.objective_options.allow_custom_rewards is False
