"""The package's error types. Each message names what is wrong (file, key, value, row, step)
and what is allowed; all derive from SkipvisionError, a ValueError, so a caller (or a CLI,
which prints one line and exits 2) can tell a bad input from a bug. `check_fields` and
`require` raise ConfigError for a config's fields (type, range) and rules."""


class SkipvisionError(ValueError):
    """Base of the errors below."""


class ConfigError(SkipvisionError):
    """A configuration value of the wrong type or out of range."""


class CheckpointError(SkipvisionError):
    """A checkpoint that cannot be found, read, trusted or fitted to its config."""


class InputError(SkipvisionError):
    """A bad image, prompt, token id or generation setting."""


class NonFiniteError(SkipvisionError):
    """NaN or inf in weights, pixels, logits or a loss."""


def check_fields(obj, section: str, rules: dict) -> None:
    """Check fields against rules {name: (kind, allowed)}: kind "int", "num" (stored as
    float), "bool" or "str", with a trailing "?" if None is allowed; allowed is an inclusive
    (lo, hi) range for numbers and a tuple of choices for strings."""
    for name, (kind, allowed) in rules.items():
        v = getattr(obj, name)
        if v is None and kind.endswith("?"):
            continue
        kind = kind.rstrip("?")
        if kind == "bool":
            ok, want = isinstance(v, bool), "true or false"
        elif kind == "str":
            ok, want = isinstance(v, str) and v in allowed, f"one of {list(allowed)}"
        else:
            number = (int,) if kind == "int" else (int, float)
            ok = isinstance(v, number) and not isinstance(v, bool) and allowed[0] <= v <= allowed[1]
            want = f"{'an integer' if kind == 'int' else 'a number'} in [{allowed[0]}, {allowed[1]}]"
            if ok and kind == "num":
                object.__setattr__(obj, name, float(v))
        if not ok:
            raise ConfigError(f"{section}{name} must be {want}, got {v!r}")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
