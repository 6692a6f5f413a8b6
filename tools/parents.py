"""The parent record of a run: the published record that its preset starts from.

A log of our trainer names its preset in its header (`preset: "aurora_2860"`). PARENTS maps each
preset that reproduces a published Aurora record to the in-repo copy of that record's output
(records/published_aurora_<steps>/: the output parts of upstream's logs, without their code);
the SOAP-Muon presets map to the record their published result built on (soap_2690: #45's,
soap_2720: #44's; soap_2750: #41 built on #40 and is no preset here, so #40's, with a note that
says so); every other preset (record, tiny, small, ...), and a log without a preset line
(upstream's, older ones of ours), gets the record's parent, the published 3175-step record. `diff A` (no B) and
`submit` (no --baseline) compare with parent_of(A's logs); a B or --baseline given overrides it.
"""
import os
from collections import namedtuple

if __name__ == "__main__":  # a module of the toolkit, not a command
    raise SystemExit("tools/parents.py is a module of the records toolkit, not a command: "
                     "python tools/records.py --help lists the commands")

from tools.logs import RecordsError, header_value  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_DIR = os.path.join(ROOT, "records")

# path: under records/ (a log, or a folder of logs); label: what the record is, for READMEs and diffs;
# note: why this is the default when it is not the published parent itself
Parent = namedtuple("Parent", "path label note", defaults=(None,))
DEFAULT_PRESET = "record"
RESULT_40 = "modded-nanoGPT optimization track #40 (#30 wrapped in EMA-Nesterov; 2890 steps, 16 seeds, 8xA100)"
PARENTS = {
    "record": Parent("published_aurora_3175/track3_aurora_3175_n20.txt",
                     "modded-nanoGPT optimization track #17 (Tilde Research's Aurora, 3175 steps, "
                     "20 seeds, 8xH100)"),
    "aurora_2930": Parent("published_aurora_2930",
                          "modded-nanoGPT optimization track #30 (Aurora on the wide mlp.proj "
                          "matrices, Contra-Muon ramp to step 2500; 2930 steps, 16 seeds, 8xH200)"),
    "aurora_2890": Parent("published_aurora_2890", RESULT_40),
    "aurora_2860": Parent("published_aurora_2860",
                          "modded-nanoGPT optimization track #42 (#40 with zero-init biases and "
                          "reference interpolation; 2860 steps, 16 seeds, 8xL40S)"),
    "soap_2750": Parent("published_aurora_2890", RESULT_40,
                        "the nearest preset ancestor of #41, soap_2750's published parent, which is not a "
                        "preset here"),
    "soap_2720": Parent("published_soap_2750",
                        "modded-nanoGPT optimization track #44 (SOAP-Muon on every hidden matrix, refreshed "
                        "every step, no Aurora; 2750 steps, 20 seeds, 8xH100)"),
    "soap_2690": Parent("published_soap_2720",
                        "modded-nanoGPT optimization track #45 (#44 blended towards its tail EMA at the "
                        "claimed step; 2720 steps, 10 seeds, 1xGH200)"),
}


def parent_entry(preset):
    """The Parent of a preset: for a list of presets (`aurora_2860+small`) the first one's in
    PARENTS; the record's for presets not in PARENTS."""
    named = [p for p in (preset or "").split("+") if p in PARENTS]
    return PARENTS[named[0] if named else DEFAULT_PRESET]


def parent_path(preset):
    """The absolute path of a preset's parent record (parent_entry)."""
    return os.path.join(PUBLISHED_DIR, parent_entry(preset).path)


def parent_note(preset):
    """' (why)' when the preset's default parent is not its published parent itself, else ''."""
    note = parent_entry(preset).note
    return f" ({note})" if note else ""


PUBLISHED = parent_path(DEFAULT_PRESET)  # the record's parent: the published 3175-step record


def preset_of(logs):
    """The preset named in the first log's header (our trainer writes it as JSON), or None."""
    value = logs[0]["hyperparameters"].get("preset") if logs else None
    value = header_value(value) if value is not None else None
    return value if isinstance(value, str) else None


def parent_of(logs):
    """(path, preset) of the default parent record of a run whose logs are `logs`."""
    preset = preset_of(logs)
    return parent_path(preset), preset


def default_parent(logs, how_to_choose):
    """parent_of(logs), refused (RecordsError) when that record is missing from records/ (a
    partial checkout): the message says it is the default parent and how to name another."""
    path, preset = parent_of(logs)
    if not os.path.exists(path):
        raise RecordsError(f"the default parent record of these logs (preset {preset or 'none'}), "
                           f"{path}, is missing: restore it (git checkout -- records/) or "
                           f"{how_to_choose} to name another")
    return path, preset


def published_label(path):
    """'the published record, <label> (in-repo copy of its output: records/<dir>/)' when `path`
    is one of the in-repo copies in PARENTS (the log or its folder), else None."""
    where = os.path.abspath(path)
    for parent in PARENTS.values():
        full = os.path.join(PUBLISHED_DIR, parent.path)
        folder = full if os.path.isdir(full) else os.path.dirname(full)
        if where in (full, folder):
            return (f"the published record, {parent.label} (in-repo copy of its output: "
                    f"records/{os.path.relpath(folder, PUBLISHED_DIR)}/)")
    return None
