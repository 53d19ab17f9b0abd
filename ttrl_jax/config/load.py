"""Run configuration: the sections of schema.py, from YAML files and dotted overrides.

The dataclass defaults are the paper's settings; `configs/toy.yaml` holds the small built-in
CPU run. A YAML file is a partial
`Config`; `key=value` overrides (`sample.n_vote=16`) are applied after it. OmegaConf does the
parsing and type checking; unknown keys, wrong types and inconsistent values raise `ConfigError`
naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ttrl_jax.config.schema import (
    DEFAULT_CONFIG,
    TOY_MODEL,
    TOY_MODEL_DIR,
    Config,
    ConfigError,
    Problems,
)

# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    device_count: int | None = None,
) -> Config:
    """Builds a Config from the defaults, an optional YAML file and `key=value` overrides.

    Args:
      path: a YAML file holding a partial Config (sections and keys as in the dataclasses);
        None = the dataclass defaults only (see `default_config_path` for the built-in run).
      overrides: dotted `section.key=value` strings applied in order after the file, values
        in YAML syntax (`sample.prompt_buckets=[128,256]`, `data.path=null`).
      device_count: the devices the run will have, to check an explicit mesh.shape against;
        None = unknown.

    Returns:
      The validated, frozen Config.

    Raises:
      ConfigError: missing or malformed file, unknown key, wrong type, or inconsistent values;
        the message names the key and the file or override it came from.
    """
    merged = OmegaConf.structured(Config)
    # A value outside its choices is recorded and the rest still merged, so that one error
    # lists every problem (as validation below does).
    bad_choices: list[str] = []
    if path is not None:
        merged = _merge(merged, _read_yaml(path), f"config file {os.fspath(path)}", bad_choices)
    for item in overrides:
        merged = _merge(merged, _parse_override(item), f"override '{item}'", bad_choices)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve '{e.full_key}': {_first_line(e.msg)}") from None
    problems = bad_choices + _problems(cfg, None, device_count)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def default_config_path() -> str:
    """The built-in CPU run's YAML (configs/toy.yaml in the source tree)."""
    if not DEFAULT_CONFIG.is_file():
        raise ConfigError(
            f"built-in config {DEFAULT_CONFIG} not found (an installation without the configs/ "
            "folder); pass --config with a YAML file."
        )
    return str(DEFAULT_CONFIG)


def resolve_model_path(name_or_path: str) -> str:
    """model.name_or_path as a loader argument: "toy" becomes the packaged folder."""
    return str(TOY_MODEL_DIR) if name_or_path == TOY_MODEL else name_or_path


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dicts and lists (no tuples), e.g. for logging hyperparameters."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML; `load_config(path)` gives it back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _read_yaml(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {os.fspath(path)} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"config file {os.fspath(path)} is not valid YAML: {e}") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(
            f"config file {os.fspath(path)} must be a mapping of sections "
            f"({', '.join(_fields(Config))}), got a {type(loaded).__name__}"
        )
    return loaded


def _parse_override(item: str) -> Any:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override '{item}' is not of the form section.key=value (e.g. sample.n_vote=16)"
        )
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        if _is_text_key(key.strip()):
            # Text such as "{question} Answer with a number." is not YAML; take it as written.
            return OmegaConf.create(_nested(key.strip(), value))
        raise ConfigError(f"override '{item}': cannot parse the value: {e}") from None


def _is_text_key(dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    cls = _section_class(parent)
    hint = typing.get_type_hints(cls).get(leaf) if cls is not None else None
    return hint in (str, str | None)


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(base: Any, update: Any, source: str, bad_choices: list[str]) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {_unknown_key_message(e.full_key)}") from None
    except ValidationError as e:
        reason = _first_line(e.msg or e)
        if not e.full_key:
            scalars = [k for k, v in update.items() if not OmegaConf.is_dict(v)]
            if scalars:
                reason = (
                    f"'{scalars[0]}' is a section, not a value; set its keys instead, e.g. "
                    f"{scalars[0]}.{_fields(_section_class(str(scalars[0])) or Config)[0]}=..."
                )
            raise ConfigError(f"{source}: {reason}") from None
        allowed = _choices(e.full_key)
        if allowed:
            value = OmegaConf.select(update, e.full_key)
            bad_choices.append(f"{e.full_key}={value!r} is not one of {', '.join(allowed)}")
            parent, _, leaf = e.full_key.rpartition(".")
            del (OmegaConf.select(update, parent) if parent else update)[leaf]
            return _merge(base, update, source, bad_choices)
        if OmegaConf.is_dict(OmegaConf.select(update, e.full_key)):
            raise ConfigError(
                f"{source}: '{e.full_key}' is a value, not a section; set it directly"
            ) from None
        raise ConfigError(
            f"{source}: bad value for '{e.full_key}': {reason} "
            f"(expected {_expected_type(e.full_key)})"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_first_line(e.msg)}") from None


def _first_line(message: str) -> str:
    """OmegaConf appends full_key/object_type lines, which our messages already say better."""
    return str(message).split("\n", 1)[0].strip()


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_class(dotted: str) -> type | None:
    """The dataclass at a dotted path ('' = Config), or None if it is a value or unknown."""
    cls: type = Config
    for part in filter(None, dotted.split(".")):
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        cls = hints[part]
    return cls


def _unknown_key_message(full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    cls = _section_class(parent)
    if cls is None:
        return f"'{parent}' is a value, not a section, so '{full_key}' is not a valid key"
    valid = _fields(cls)
    close = difflib.get_close_matches(leaf, valid, n=1)
    if cls is Config:
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown section '{full_key}'.{hint} Valid sections: {', '.join(valid)}"
    hint = f" Did you mean '{parent}.{close[0]}'?" if close else ""
    return f"unknown key '{full_key}'.{hint} Valid keys of '{parent}': {', '.join(valid)}"


def _choices(full_key: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed key; () for any other key."""
    parent, _, leaf = full_key.rpartition(".")
    cls = _section_class(parent)
    hint = typing.get_type_hints(cls).get(leaf) if cls is not None else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. bool | Literal[...]
        hint = next((h for h in typing.get_args(hint) if typing.get_origin(h) is Literal), None)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _expected_type(full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    cls = _section_class(parent)
    hint = typing.get_type_hints(cls).get(leaf) if cls is not None else None
    if hint is None:
        return "another type"
    return hint.__name__ if hint in (bool, int, float, str) else str(hint)


# ----------------------------------------------------------------------------- validation


def validate_config(cfg: Config, data_axis_size: int | None = None) -> None:
    """Checks values and cross-field constraints; raises one ConfigError listing every problem.

    Args:
      cfg: the config to check.
      data_axis_size: size of the mesh's data axis, for the divisibility checks; None = take it
        from an explicit `mesh.shape` (skipped for "auto" until the devices are known).
    """
    problems = _problems(cfg, data_axis_size)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def check_context_length(cfg: Config, max_position_embeddings: int) -> None:
    """Raises ConfigError if the longest prompt plus the longest response exceeds the context."""
    longest = cfg.data.max_prompt_tokens + max(cfg.sample.max_new_tokens, cfg.eval.max_new_tokens)
    if longest > max_position_embeddings:
        raise ConfigError(
            f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) + max_new_tokens "
            f"(sample {cfg.sample.max_new_tokens}, eval {cfg.eval.max_new_tokens}) = {longest} "
            f"exceeds the model's context of {max_position_embeddings} tokens; lower them"
        )


def _problems(
    cfg: Config, data_axis_size: int | None, device_count: int | None = None
) -> list[str]:
    """Every section's own checks, then the checks that span sections."""
    out = Problems()
    size = cfg.mesh.size()
    if size is not None and device_count is not None and size != device_count:
        # Reported instead of the row divisibility checks, which assume this mesh.
        out.append(
            f"mesh.shape={cfg.mesh.shape!r} needs {size} devices but {device_count} are "
            f"available; choose D and M with D*M = {device_count} (or mesh.shape=auto)"
        )
        data_axis_size = -1
    for f in dataclasses.fields(cfg):
        out += getattr(cfg, f.name).problems()
    s, o, d = cfg.sample, cfg.optim, cfg.data
    if s.prompt_buckets:
        out.need(
            max(s.prompt_buckets) >= d.max_prompt_tokens,
            f"the largest of sample.prompt_buckets ({max(s.prompt_buckets)}) is smaller than "
            f"data.max_prompt_tokens ({d.max_prompt_tokens}); add a bucket >= "
            f"{d.max_prompt_tokens} or lower data.max_prompt_tokens",
        )
    if 0 < s.prompt_chunk < d.batch_prompts:
        out.need(
            d.batch_prompts % s.prompt_chunk == 0,
            f"sample.prompt_chunk={s.prompt_chunk} must divide "
            f"data.batch_prompts={d.batch_prompts}",
        )
    if o.mini_batch_prompts >= 1 and d.batch_prompts >= 1:
        out.need(
            d.batch_prompts % o.mini_batch_prompts == 0,
            f"optim.mini_batch_prompts={o.mini_batch_prompts} must divide "
            f"data.batch_prompts={d.batch_prompts}",
        )
    mini_rows = o.mini_batch_prompts * s.n_train
    if o.micro_batch_size is not None:
        out.need(
            o.micro_batch_size >= 1 and mini_rows % o.micro_batch_size == 0,
            f"optim.micro_batch_size={o.micro_batch_size} must divide the rows of a mini-batch "
            f"(optim.mini_batch_prompts x sample.n_train = {mini_rows})",
        )
    r = cfg.run
    out.need(
        not r.export_peft or cfg.model.lora.rank > 0,
        "run.export_peft writes LoRA adapters: it needs model.lora.rank > 0",
    )
    if r.keep == "best" or r.stop_rule != "off" or r.collapse_guard != "off":
        out.need(
            cfg.eval.before_training,
            f"run.keep={r.keep} / run.stop_rule={r.stop_rule} / run.collapse_guard="
            f"{r.collapse_guard} judge each evaluation against the base model's, so they need "
            "eval.before_training=true",
        )
    if data_axis_size is None:
        data_axis_size = cfg.mesh.data_size()
    if d.batch_prompts >= 1 and data_axis_size is not None and data_axis_size > 0:
        _check_data_axis(out, cfg, data_axis_size)
    return out


def _check_data_axis(out: list[str], cfg: Config, size: int) -> None:
    """Batch dimensions are split evenly over the data axis."""
    rows = {
        "rollout rows (data.batch_prompts x sample.n_vote)": (
            cfg.data.batch_prompts * cfg.sample.n_vote
        ),
        "mini-batch rows (optim.mini_batch_prompts x sample.n_train)": (
            cfg.optim.mini_batch_prompts * cfg.sample.n_train
        ),
    }
    if cfg.optim.micro_batch_size is not None:
        rows["optim.micro_batch_size"] = cfg.optim.micro_batch_size
    if 0 < cfg.sample.prompt_chunk < cfg.data.batch_prompts:
        rows["prompts per sampling pass (sample.prompt_chunk)"] = cfg.sample.prompt_chunk
    # Each data shard samples its own prompts (the sampler's and the rounds' prompt inputs are
    # split over the data axis).
    rows["prompts of a step (data.batch_prompts)"] = cfg.data.batch_prompts
    for what, n in rows.items():
        if n % size:
            out.append(
                f"{what} = {n} is not divisible by the mesh's data axis ({size}); "
                "change the numbers or the mesh (mesh.shape / --mesh)"
            )
