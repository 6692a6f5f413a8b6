"""tools/campaign.py and the trainer's campaign line: the chance that a campaign of N trials passes
given the k in, against a brute-force simulation of the same model; the folder command on the
published logs; the futility stop (--stop-below) of a tiny in-process campaign; --stop-above
refused."""
import glob
import json
import math
import os

import numpy as np
import pytest

import train_gpt
from test_train import SMALL, only_log, run
from tools import records
from tools.campaign import (campaign_decision, campaign_line, campaign_of, parent_spread,
                            predictive_pass, t_cdf, trials_for)
from tools.logs import load_record
from tools.parents import PUBLISHED
from tools.stats import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_2860 = os.path.join(ROOT, "records", "published_aurora_2860")


def test_t_cdf_matches_closed_forms():
    x = np.linspace(-40, 40, 801)
    assert np.allclose(t_cdf(x, 1), 0.5 + np.arctan(x) / math.pi, atol=1e-14)
    assert np.allclose(t_cdf(x, 2), 0.5 + x / (2 * np.sqrt(2 + x ** 2)), atol=1e-14)
    assert np.allclose(t_cdf(x, 3), 0.5 + (np.arctan(x / math.sqrt(3)) + math.sqrt(3) * x / (3 + x ** 2))
                       / math.pi, atol=1e-14)
    normal = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    assert np.abs(t_cdf(x, 4000) - normal).max() < 1e-4  # t_nu -> Normal


def brute_force(losses, n, target, prior, draws=100_000, seed=0):
    """The model simulated draw by draw: sigma^2 from its posterior, then mu, then the n - k
    losses to come one by one; the share of campaigns whose n-trial mean passes."""
    rng = np.random.default_rng(seed)
    x = np.asarray(losses)
    k = len(x)
    s0, nu0 = prior if k < 3 else (0.0, 0)
    nu = nu0 + k - 1
    scale2 = (nu0 * s0 ** 2 + (x.var(ddof=1) * (k - 1) if k > 1 else 0.0)) / nu
    sigma2 = nu * scale2 / rng.chisquare(nu, draws)
    mu = rng.normal(x.mean(), np.sqrt(sigma2 / k))
    rest = rng.normal(mu[:, None], np.sqrt(sigma2)[:, None], (draws, n - k))
    mean_n = (x.sum() + rest.sum(1)) / n
    return float(((target - mean_n) * math.sqrt(n) >= 0.004 - 1e-12).mean())


@pytest.mark.parametrize("losses, n, prior", [
    ([3.2795, 3.2781, 3.2790, 3.2779, 3.2801], 16, None),    # own spread (Jeffreys)
    ([3.2790, 3.2805, 3.2799], 12, None),
    ([3.2801], 20, (0.00111, 19)),                           # k < 3: the parent's spread
    ([3.2801, 3.2779], 8, (0.00111, 19)),
])
def test_predictive_chance_matches_a_brute_force_simulation(losses, n, prior):
    k = len(losses)
    std = float(np.std(losses, ddof=1)) if k > 1 else 0.0
    exact = predictive_pass(np.mean(losses), std, k, n, 3.28, prior if k < 3 else None)
    assert 0.02 < exact < 0.98  # a case where the answer is not trivially 0 or 1
    assert exact == pytest.approx(brute_force(losses, n, 3.28, prior), abs=0.01)


def test_all_trials_in_is_certain_and_trials_for_90_percent_is_conditioned_on_them():
    assert predictive_pass(3.2789, 0.001, 20, 20, 3.28) == 1.0   # margin 0.00492: passes
    assert predictive_pass(3.2792, 0.001, 20, 20, 3.28) == 0.0   # margin 0.00358: fails
    # 4 in with mean 3.2785: more trials only help (the mean needed rises towards 3.28)
    n90 = trials_for(3.2785, 0.0012, 4, 3.28)
    assert n90 > 4 and predictive_pass(3.2785, 0.0012, 4, n90, 3.28) >= 0.9 > \
        predictive_pass(3.2785, 0.0012, 4, n90 - 1, 3.28)
    assert trials_for(3.2815, 0.0012, 10, 3.28) is None  # above the target: no n reaches 90%


def test_a_passing_claim_never_stops_a_campaign():
    c = dict(k=5, n=10, step=3175, chance=0.999)
    assert campaign_decision(c, 0.05) is None
    assert campaign_decision(dict(c, chance=0.01), None) is None          # off by default
    assert campaign_decision(dict(c, k=10, chance=0.0), 0.05) is None     # nothing left to stop
    assert campaign_decision(dict(c, chance=0.01), 0.05).startswith("campaign stopped: after 5 of 10")


def test_the_folder_command_on_the_published_logs(capsys):
    assert records.main(["campaign", PUBLISHED_2860, "--trials", "20", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    s = summarize(load_record(PUBLISHED_2860)["runs"])
    assert (c["k"], c["step"], c["step_why"]) == (16, 2860, "the trials' own earliest passing step")
    assert c["mean"] == pytest.approx(s["mean"]) and c["std"] == pytest.approx(s["std"])
    assert c["chance"] == pytest.approx(predictive_pass(s["mean"], s["std"], 16, 20, 3.28))
    assert 0.5 < c["chance"] < 0.99 and c["n90"] == 16  # passes with the 16 in: 16 suffice
    # two logs only: the spread is the parent's (the 3175-step record, 20 trials at 3175)
    two = sorted(glob.glob(os.path.join(PUBLISHED_2860, "*.txt")))[:2]
    c = campaign_of(two, 16, step=2860)
    assert c["k"] == 2 and "20 published trials at step 3175" in c["model"]
    assert parent_spread(PUBLISHED)[:2] == (pytest.approx(0.00111, abs=5e-6), 19)
    assert records.main(["campaign", *two, "--trials", "16", "--step", "2860"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == campaign_line(c)


@pytest.mark.parametrize("argv, message", [
    (["--trials", "10"], "--trials 10 is less than the 20 complete trials already in"),
    (["--trials", "0"], "--trials must be a whole number >= 1"),
    (["--trials", "30", "--step", "3177"], "--step 3177 is not a validated step of every counted trial"),
    (["--trials", "30", "--target", "nan"], "--target is not a finite positive val loss"),
])
def test_the_folder_command_refuses_bad_input(argv, message, capsys):
    assert records.main(["campaign", PUBLISHED, *argv]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and message in out.err


STOP_RUN = SMALL + ["--train-steps", "2", "--val-every", "2", "--val-every-late", "2", "--no-diagnostics"]


def test_a_campaign_that_cannot_pass_stops_after_its_first_trial(data_dir, tmp_path, capsys):
    assert run(STOP_RUN + ["--trials", "3", "--seed", "5", "--stop-below", "0.5", "--val-loss-target", "1.0",
                           "--run-name", "futile"], data_dir, tmp_path) == 0
    folder = glob.glob(str(tmp_path / "*_futile"))[0]
    text = open(only_log(folder)).read()
    output = text.split("=" * 100)[-1]
    assert output.count("\ntrial:") == 1 and "trial:0 seed:5" in output  # trials 1 and 2 never began
    lines = output.splitlines()
    line = next(x for x in lines if x.startswith("campaign: "))
    assert line.startswith("campaign: 1 of 3 trials in; step 2: ") and "chance it passes at step 2: <0.1%" in line
    assert "from the parent record's 20 published trials" in line  # k < 3: the parent's spread,
    assert "a stand-in: they trained on FineWeb, these trials on a 1024-token vocabulary" in line  # said so
    stop = lines[lines.index(line) + 1]
    assert stop.startswith("campaign stopped: after 1 of 3 trials, for futility") and "--stop-below 0.5" in stop
    assert lines[lines.index(stop) + 1].startswith("final val losses: ")  # the run ends cleanly
    assert stop in capsys.readouterr().out
    summary = json.load(open(os.path.join(folder, "summary.json")))
    assert summary["n"] == 1 and not summary["incomplete"]  # the trial run is complete and counted
    assert any(n.startswith("campaign was stopped (") and "for futility" in n for n in summary["notes"])
    # the folder command gives the trainer's line; submit says why there is nothing to submit
    assert records.main(["campaign", folder, "--trials", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == line
    assert records.main(["submit", folder, "--name", "futile", "--out", str(tmp_path / "out")]) == 2
    assert "the campaign was stopped" in capsys.readouterr().err


def test_a_campaign_that_passes_runs_all_its_trials(data_dir, tmp_path):
    assert run(STOP_RUN + ["--trials", "2", "--stop-below", "0.5", "--val-loss-target", "6.9",
                           "--run-name", "fine"], data_dir, tmp_path) == 0
    output = open(only_log(glob.glob(str(tmp_path / "*_fine"))[0])).read().split("=" * 100)[-1]
    lines = [x for x in output.splitlines() if x.startswith("campaign")]
    assert len(lines) == 2 and lines[0].startswith("campaign: 1 of 2 trials in")
    assert "chance it passes at step 2: >99.9%" in lines[0]
    assert "chance it passes at step 2: all in, it passes" in lines[1]
    assert output.count("\ntrial:") == 2


@pytest.mark.parametrize("argv, message", [
    (["--stop-above", "0.9"], "--stop-above is refused"),
    (["--stop-above=0.9"], "inflates the chance of a false claim"),
    (["--trials", "4", "--stop-below", "1.5"], "--stop-below must be in (0, 1)"),
    (["--trials", "4", "--stop-below", "0"], "--stop-below must be in (0, 1)"),
    (["--trials", "4", "--stop-below", "nan"], "--stop-below must be in (0, 1)"),
    (["--stop-below", "0.05"], "stops a campaign of --trials >= 2"),
])
def test_stop_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_gpt.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_evidence_replay_of_the_published_record(capsys):
    """tools/campaign_evidence.py's replay on the in-repo copy of the 3175-step record's log (#17
    upstream): the numbers its records folder states for that result."""
    from tools.campaign_evidence import main, replay
    runs = load_record(PUBLISHED)["runs"]
    losses = [r["losses"][r["steps"].index(3175)] for r in runs]
    assert len(losses) == 20 and summarize(runs)["step"] == 3175
    prior = parent_spread(PUBLISHED)
    assert replay(losses, 20, 3.28, prior, 0.05)[0] is None  # the record itself: never stopped
    assert [replay([x + d for x in losses], 20, 3.28, prior, 0.05)[0]
            for d in (0.001, 0.002, 0.003)] == [5, 2, 2]
    assert main([ROOT, "--out", "unused"]) == 2  # not an upstream checkout: refused, nothing written
    assert "is not a modded-nanogpt checkout" in capsys.readouterr().err
