"""One resolver for everything a request names: the `model` of every endpoint, and every model,
adapter, teacher, judge, reward model and template in a job's option blocks.

A request comes from a key holder, not from the operator, so a name is accepted only as:
- a builtin alias (`tunery.models.ALIASES`, chat models);
- a model the operator registered (`tunery models add`, `serve/model_registry.py`), resolved to its
  source (a server path or a hub id in the local cache) whether or not local models are allowed:
  the operator chose it;
- in an inference request (`resolve_model_name`), one of the calling key's own model aliases
  (`serve/alias_store.py`), resolved to its target by the rules below, as if the key had named it;
- an `ft:` model or checkpoint the calling key owns (its directory inside the data dir);
- a file id (`file-...`) the key owns, where a field names a file (a judge template);
- a judge endpoint the operator registered (`tunery serve --judge NAME=URL`);
- an absolute path on the server, only when the operator turned local models on
  (`--allow-local-models`, the default only for `--no-auth` on loopback), and never one inside the
  data dir, where every key's jobs live.

Anything else (`../` paths, relative paths, hub ids, another key's models) gets the same 404, whether
or not the thing exists, so the answer tells nothing about the server's disk. Requests never carry
URLs or environment-variable names: such fields are refused with a 400.

Option fields say what they name in their pydantic field, `json_schema_extra={"names": KIND}` (model,
adapter, file, endpoint, url, env). The resolver walks the method's and objective's option schemas,
so a new plug-in is covered by marking its fields. What it resolves to is kept in the job row apart
from the options the API echoes (`ext["resolved"]`, applied by `jobs.spec.build_config`), so no
server path or endpoint URL is ever shown to the key holder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from tunery.errors import NotFoundError
from tunery.models.aliases import ALIASES, Alias
from tunery.models.resolve import is_model_path
from tunery.plugins import option_schema
from tunery.serve.alias_store import AliasTable, alias_table, is_alias_name
from tunery.serve.common import ApiError, Principal
from tunery.serve.model_registry import ModelRegistry

# Keys that would make the server send something somewhere or read its own environment. Refused in
# any option block even when no schema marks them, so a plug-in that forgets a mark is still safe.
_NEVER_IN_REQUESTS = re.compile(r"(^|_)(url|uri|env|api_key)$", re.IGNORECASE)


@dataclass(frozen=True)
class Named:
    """A model a request named, made concrete: what the engine or trainer loads."""

    spec: str  # a builtin alias or a server path
    adapter: str | None = None  # a model dir relative to the data dir (ft: models and checkpoints)


def chat_aliases() -> dict[str, Alias]:
    """Builtin base models that can chat and be fine-tuned (encoder aliases are left out)."""
    return {k: a for k, a in ALIASES.items() if a.kind == "causal-lm"}


def model_not_found(name: str, param: str = "model") -> ApiError:
    """The one answer for a name that is missing, refused or someone else's: it reveals nothing."""
    return ApiError(
        404,
        f"The model `{_shown(name)}` does not exist or you do not have access to it.",
        code="model_not_found",
        param=param,
    )


def _file_not_found(name: str, param: str) -> ApiError:
    return ApiError(
        404,
        f"The file `{_shown(name)}` does not exist or you do not have access to it.",
        code="file_not_found",
        param=param,
    )


def _shown(name: str) -> str:
    return name if len(name) <= 200 else name[:200] + "…"


class Resolver:
    """Resolves names for one server: its settings (local models, judges) and its store (owners)."""

    def __init__(self, settings: Any, store: Any, aliases: AliasTable | None = None):
        self.settings = settings
        self.store = store
        self.aliases = aliases  # None: names are never looked up as aliases (job option blocks)

    # ---- single names
    def model(self, who: Principal, name: Any, param: str = "model") -> Named:
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"Missing required parameter: '{param}'.", param=param)
        if name.startswith("ft:"):
            found = self.store.find_model(who.id, name)
            if found is None:
                raise model_not_found(name, param)
            return Named(found[0], found[1])
        if name in chat_aliases():
            return Named(name)
        registered = self.registered(name)
        if registered is not None:
            return Named(registered)
        path = self._local(name)
        if path is not None and _probe(is_model_path, path):
            return Named(str(path))
        raise model_not_found(name, param)

    def served(self, who: Principal, name: Any, param: str = "model") -> Named:
        """What an inference request's `model` loads: a name `model` takes, or one of the key's own
        aliases. Builtin and registered names win over an alias (one added by an upgrade or by the
        operator cannot be shadowed)."""
        found = None
        if self.aliases is not None and is_alias_name(name) and not self._base_name(name):
            found = self.aliases.find(who.id, name)
        if found is None:
            return self.model(who, name, param)
        try:
            return self.model(who, found.model, param)
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise ApiError(
                404,
                f"The alias `{name}` points to `{_shown(found.model)}`, which does not exist any more "
                f"or you do not have access to it. Point it at another model "
                f"(POST /v1/tunery/aliases/{name}).",
                code="model_not_found",
                param=param,
            ) from None

    def _base_name(self, name: str) -> bool:
        return name in chat_aliases() or self.registered(name) is not None

    def registered(self, name: str) -> str | None:
        """The source of a model the operator registered under `name`, or None."""
        row = ModelRegistry(self.store).find(name)
        return row.source if row is not None else None

    def saved_dir(self, who: Principal, name: str, param: str) -> tuple[str, str]:
        """A saved model/adapter dir (adapters, reward models): an owned ft: model, or a local dir."""
        if name.startswith("ft:"):
            found = self.store.find_model(who.id, name)
            if found is not None:
                return "data", found[1]
        else:
            path = self._local(name)
            if path is not None and _probe(Path.is_dir, path):
                return "spec", str(path)
        raise model_not_found(name, param)

    def file(self, who: Principal, name: str, param: str) -> tuple[str, str]:
        """A file a field reads (a judge template): an owned file id, or a local file."""
        if name.startswith("file-"):
            try:
                return "data", self.store.get_file(who.id, name).path
            except NotFoundError:
                raise _file_not_found(name, param) from None
        path = self._local(name)
        if path is not None and _probe(Path.is_file, path):
            return "spec", str(path)
        raise _file_not_found(name, param)

    def endpoint(self, name: str, param: str) -> tuple[str, str | None]:
        """(URL, name of the variable holding its key) of a judge endpoint the operator registered."""
        judges = self.settings.judges or {}
        if name not in judges:
            known = ", ".join(sorted(judges)) or "none"
            raise ApiError(
                400,
                f"Unknown judge endpoint {_shown(name)!r}; the server's registered endpoints: {known}.",
                code="unknown_endpoint",
                param=param,
            )
        return judges[name], (self.settings.judge_key_envs or {}).get(name)

    def _local(self, name: str) -> Path | None:
        """The server path an absolute name points to, when the operator allows local models and the
        path is outside the data dir (other keys' runs live there; they are reached by ft: names)."""
        if not self.settings.allow_local_models:
            return None
        path = Path(name)
        if "\0" in name or not path.is_absolute() or ".." in path.parts:
            return None
        try:
            inside = path.resolve().is_relative_to(Path(self.store.data_dir).resolve())
        except (OSError, RuntimeError):  # a symlink loop, a name too long: nothing to load there
            return None
        return None if inside else path

    # ---- a job's option blocks
    def options(self, who: Principal, options: dict[str, Any]) -> dict[str, list[Any]]:
        """Check every name in a job's option blocks. Returns what they resolve to, by dotted field
        (`{"distill.teacher_adapter": ["data", "jobs/ftjob-1/model"]}`): "data" values are relative
        to the data dir, "spec" values are used as they are."""
        out: dict[str, list[Any]] = {}
        for block, values in options.items():
            if isinstance(values, dict):
                self._walk(who, option_schema(block), values, block, out)
        return out

    def _walk(
        self, who: Principal, schema: type[BaseModel] | None, block: dict, prefix: str, out: dict
    ) -> None:
        for key, value in block.items():
            field = schema.model_fields.get(key) if schema is not None else None
            extra = field.json_schema_extra if field is not None else None
            marks = extra if isinstance(extra, dict) else {}
            kind = marks.get("names")
            dotted, param = f"{prefix}.{key}", f"tunery.{prefix}.{key}"
            if kind in ("url", "env") or _NEVER_IN_REQUESTS.search(str(key)):
                raise _never_in_requests(param, self.settings)
            if isinstance(kind, str) and isinstance(value, str):
                self._named(who, kind, marks, value, block, prefix, dotted, out)
            elif isinstance(value, dict):
                sub = field.annotation if field is not None else None
                nested = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
                self._walk(who, nested, value, dotted, out)
            elif isinstance(value, list):  # only for refused keys: list items are never resolved
                for item in value:
                    if isinstance(item, dict):
                        self._walk(who, None, item, dotted, out)

    def _named(
        self,
        who: Principal,
        kind: str,
        marks: dict,
        value: str,
        block: dict,
        prefix: str,
        dotted: str,
        out: dict,
    ) -> None:
        param = f"tunery.{dotted}"
        if kind == "model":
            named = self.model(who, value, param)
            out[dotted] = ["spec", named.spec]
            sibling = marks.get("adapter")
            if named.adapter is not None and sibling:
                if block.get(sibling) is not None:
                    raise ApiError(
                        400,
                        f"{param} names a fine-tuned model, which brings its own adapter; leave "
                        f"tunery.{prefix}.{sibling} out.",
                        param=f"tunery.{prefix}.{sibling}",
                    )
                out[f"{prefix}.{sibling}"] = ["data", named.adapter]
        elif kind == "adapter":
            out[dotted] = list(self.saved_dir(who, value, param))
        elif kind == "file":
            out[dotted] = list(self.file(who, value, param))
        elif kind == "endpoint":
            url, key_env = self.endpoint(value, param)
            out[f"{prefix}.{marks.get('url', 'base_url')}"] = ["spec", url]
            out[f"{prefix}.{marks.get('key_env', 'api_key_env')}"] = ["spec", key_env]


def _probe(test: Any, path: Path) -> bool:
    """`test(path)`, False where the file system refuses the question (a name too long, no access)."""
    try:
        return bool(test(path))
    except (OSError, ValueError):
        return False


def _never_in_requests(param: str, settings: Any) -> ApiError:
    known = ", ".join(sorted(settings.judges or {})) or "none yet"
    return ApiError(
        400,
        f"{param} cannot be set in a request: requests never carry URLs or environment-variable "
        "names. Remote judges are registered by the server's operator "
        "(tunery serve --judge NAME=URL --judge-key-env NAME=VAR) and a request names one in "
        f"`rlaif.judge.endpoint` (registered here: {known}).",
        code="field_not_allowed",
        param=param,
    )


def get_resolver(request: Request) -> Resolver:
    state = request.app.state
    return Resolver(state.settings, state.store)


def resolve_model_name(request: Request, who: Principal, name: Any) -> tuple[str, str | None]:
    """(base spec, model dir relative to the data dir or None) of the `model` a request names; the
    calling key's aliases count (chat, completions, classifications, the dashboard's calls)."""
    state = request.app.state
    named = Resolver(state.settings, state.store, alias_table(state)).served(who, name)
    return named.spec, named.adapter
