"""Which configuration a log ran, read from its header lines and its code part without running it.

Logs of one record must share a configuration: the same code (code_signature(): its tokens without
comments, strings and seed lines) and the same hyperparameter lines (config_of()), except the
run-specific ones that differ between runs by design (run_specific(): seed, trials, data_dir and
what the logged trainer declares in PER_RUN). assign_groups() uses this to split a folder holding
several configurations (each group is summarized apart); inconsistencies() says why the logs of a
record disagree (diff and submit warn or refuse). script_facts() reads what a trainer like ours
declares (Hyperparameters defaults, PRESETS, PER_RUN) with literal(), an evaluator of constant
expressions; tools/submit.py uses it to turn a log's header back into command-line flags.
"""
import ast
import functools
import io
import operator
import os
import re
import tokenize

# Hyperparameter lines that vary between the runs of one record (as train_gpt.py's --append check);
# a log whose trainer declares PER_RUN adds those names (see run_specific()).
RUN_SPECIFIC = ("seed", "trials", "data_dir")
SEEDISH = re.compile(r"seed", re.IGNORECASE)


def code_signature(code):
    """The code part as far as it sets the configuration: its tokens without comments, strings
    (log paths, messages) and lines naming a seed (upstream scripts hard-code `SEED = k` per run),
    one string per line. Not Python: its lines without `#` comments."""
    lines, line = [], []
    skip = {tokenize.COMMENT, tokenize.STRING, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                lines.append(line)
                line = []
            elif tok.type not in skip and not tokenize.tok_name[tok.type].startswith("FSTRING"):
                line.append(tok.string)
    except (tokenize.TokenError, SyntaxError):
        lines = [text.split("#")[0].split() for text in code.splitlines()]
    return tuple(" ".join(tokens) for tokens in lines
                 if tokens and not any(SEEDISH.search(t) for t in tokens))


def assign_groups(logs, paths):
    """Split logs of several configurations: the key is the code signature and the hyperparameter
    lines (run-specific ones aside). Logs without a code part (stdout captures) join the only
    configuration there is, else form their own group. Sets each trial's `group` (a label: the
    subfolder, or the first file) only when there are several; returns notes saying so."""
    keys = []
    for log in logs:
        code = code_signature(log["code"]) if log["code"].strip() else None
        config = tuple(sorted(config_of(log).items()))
        keys.append(None if code is None and not config else (code, config))
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if len(distinct) <= 1:
        return []
    root = paths[0] if len(paths) == 1 and os.path.isdir(paths[0]) else None
    members = {}
    for log, key in zip(logs, keys):
        members.setdefault(key, []).append(log)
    where = {key: [os.path.relpath(log["path"], root) if root else log["path"] for log in group]
             for key, group in members.items()}
    folders = {key: {os.path.dirname(w) for w in files} for key, files in where.items()}
    labels = {}
    for key, group in members.items():
        folder = next(iter(folders[key])) if len(folders[key]) == 1 else ""
        if folder and not any(folder in f for k, f in folders.items() if k != key):
            labels[key] = folder + "/"  # e.g. one subfolder per configuration
        else:
            files = where[key]
            labels[key] = files[0] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
        labels[key] += " [no code part]" if key is None else ""
        for log in group:
            for t in log["trials"]:
                t["group"] = labels[key]
    first = distinct[0]
    notes = [f"the logs hold {len(members)} configurations (code or hyperparameters differ): each "
             "is summarized apart"]
    for key in members:
        if key not in (None, first):
            notes.append(f"group {labels[key]} differs from {labels[first]} in: "
                         + how_groups_differ(first, key))
    return notes


def how_groups_differ(first, other, shown=3):
    """What differs between two configurations (code signature, hyperparameter items): the first
    code line only the other has (or, when it only lacks lines, the first it lacks) and how many
    more there are, and every hyperparameter that differs, the first `shown` with the other's
    value, the rest by name ("and 4 more: ..."): nothing is left out unsaid."""
    code_a, code_b = first[0] or (), other[0] or ()
    added = [line for line in code_b if line not in set(code_a)]
    lines = added or [f"without {line}" for line in code_a if line not in set(code_b)]
    parts = [lines[0] + (f" (+{len(lines) - 1} more code lines)" if len(lines) > 1 else "")
             ] if lines else []
    diff = config_difference(dict(first[1]), dict(other[1]))
    parts += [f"{k}: {b if b is not None else '(absent)'}" for k, a, b in diff[:shown]]
    if len(diff) > shown:
        parts.append(f"and {len(diff) - shown} more: {', '.join(k for k, a, b in diff[shown:])}")
    return "; ".join(parts or ["line order"])


def config_of(log, skip=None):
    """The hyperparameters that must agree between the logs of one record."""
    skip = run_specific(log) if skip is None else skip
    return {k: v for k, v in log["hyperparameters"].items() if k not in skip}


def config_difference(hp_a, hp_b, keys=None):
    """[(name, value in a, value in b)] for the names whose values differ (None: absent)."""
    keys = sorted(set(hp_a) | set(hp_b)) if keys is None else keys
    return [(k, hp_a.get(k), hp_b.get(k)) for k in keys if hp_a.get(k) != hp_b.get(k)]


def inconsistencies(logs):
    """Why the logs of one record do not share a configuration and code part (empty: they do)."""
    first, problems = logs[0], []
    name = os.path.basename(first["path"])
    for log in logs[1:]:
        other = os.path.basename(log["path"])
        skip = run_specific(first, log)
        diff = config_difference(config_of(first, skip), config_of(log, skip))
        if diff:
            problems.append(f"{other} differs from {name} in " + ", ".join(
                f"{k} ({a if a is not None else 'absent'} vs {b if b is not None else 'absent'})"
                for k, a, b in diff))
        if log["code"] != first["code"]:
            problems.append(f"the code part of {other} differs from {name}'s "
                            f"(python tools/records.py diff {first['path']} {log['path']} shows how)")
    return problems


def run_specific(*logs):
    """Hyperparameters that may differ between runs of one record: seed, trials, data_dir, and
    whatever the logs' trainer declares in PER_RUN (e.g. run_name, records_dir, append)."""
    names = list(RUN_SPECIFIC)
    for log in logs:
        if "PER_RUN" in log["code"]:
            names += [k for k in declared_per_run(log["code"]) if k not in names]
    return tuple(names)


@functools.lru_cache(maxsize=16)
def declared_per_run(code):
    """script_facts(code)["per_run"], parsed once per code part (every log of a record has it)."""
    return script_facts(code)["per_run"]


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}


def literal(node):
    """The value of a constant expression in a script (literals, `1 / 320`, `dict(a=1)`), without
    running it; ValueError for anything else."""
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        x, y = literal(node.left), literal(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
            raise ValueError("not arithmetic")
        try:
            return BINARY[type(node.op)](x, y)
        except ArithmeticError:
            raise ValueError("bad arithmetic") from None
    if isinstance(node, (ast.Call, ast.Dict)):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id == "dict") or node.args:
                raise ValueError("not dict(...)")
            items = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        else:
            items = [(literal(k), v) for k, v in zip(node.keys, node.values) if k is not None]
        out = {}
        for key, value in items:
            try:
                out[key] = literal(value)
            except ValueError:
                pass  # e.g. a path built at run time: not needed for flags
        return out
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("not a literal") from None


def field_default(node):
    """A dataclass field's default: `x = 1`, `x = hparam(1, "help")`, `x = field(default=1)`."""
    if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id == "dict"):
        default = next((kw.value for kw in node.keywords if kw.arg == "default"), None)
        if default is None and node.args:
            default = node.args[0]
        if default is None:
            raise ValueError("no default")
        return literal(default)
    return literal(node)


def script_facts(code):
    """What a logged trainer like ours declares, read from its code part without running it:
    defaults (the field defaults of `class Hyperparameters` and of the technique modules' classes
    inlined beside it, `class LineageHyperparameters`, ...), presets (the `PRESETS` dict), per_run
    (its `PER_RUN` tuple: fields that may differ between the logs of one record), and how its
    flags look (generated: one flag per field, bools as --x/--no-x). Empty for an upstream script
    or code this reader does not understand."""
    generated = any(m in code for m in ("dataclasses.fields(Hyperparameters)",  # flags built in the file,
                                        "parse_flags(Hyperparameters"))  # or by harness.py's parse_flags
    facts = dict(defaults={}, presets={}, per_run=(), generated=generated,
                 boolean_optional="BooleanOptionalAction" in code)
    # our code part is train_gpt.py and aurora.py, each after a `#### <file> ####` line
    for section in re.split(r"(?m)^#### \S+ ####\n", code):
        if "class Hyperparameters" not in section:
            continue
        try:
            tree = ast.parse(section)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in tree.body:
            # the trainer's class and its techniques' (LineageHyperparameters, FrontierHyperparameters:
            # their fields are flags of the trainer too)
            if isinstance(node, ast.ClassDef) and node.name.endswith("Hyperparameters"):
                for item in node.body:
                    if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                            and item.value is not None):
                        try:
                            facts["defaults"][item.target.id] = field_default(item.value)
                        except ValueError:
                            pass  # e.g. a path built at run time (data_dir): no flag inferred
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name)
                  and node.targets[0].id in ("PRESETS", "PER_RUN")):
                try:
                    value = literal(node.value)
                except ValueError:
                    continue
                if node.targets[0].id == "PRESETS" and isinstance(value, dict):
                    facts["presets"] = {k: v for k, v in value.items() if isinstance(v, dict)}
                elif isinstance(value, (tuple, list)):
                    facts["per_run"] = tuple(v for v in value if isinstance(v, str))
        if facts["defaults"]:
            break
    return facts
