"""Training loops: distillation towards a teacher, and no silent NaN in self-training."""

import pytest
import torch
from torch import nn

from dec_mlflow.callbacks import Callback
from dec_mlflow.objectives import soft_assignment
from dec_mlflow.training import distill, distill_and_self_train, self_train


def _two_groups(n=200):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(n // 2, 4, generator=g) - 2.0, torch.randn(n // 2, 4, generator=g) + 2.0])
    return x


def test_distill_makes_q_follow_the_teacher():
    torch.manual_seed(0)
    x = _two_groups()
    # the teacher splits the data the other way round from where the encoder starts
    teacher = torch.zeros(200, 2)
    teacher[:100, 1] = teacher[100:, 0] = 1.0
    encoder = nn.Sequential(nn.Linear(4, 2))
    centroids = nn.Parameter(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    distill(encoder, centroids, x, teacher, alpha=1.0, batch_size=50, lr=0.1, momentum=0.9, n_iter=300, callback=Callback())
    with torch.no_grad():
        labels = soft_assignment(encoder(x), centroids).argmax(1)
    assert (labels == teacher.argmax(1)).float().mean() > 0.98


def test_distill_refuses_a_teacher_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"teacher must have shape \(n_samples, n_clusters\) = \(200, 2\); got \(200, 3\)"):
        distill(nn.Sequential(nn.Linear(4, 2)), nn.Parameter(torch.zeros(2, 2)), _two_groups(), torch.ones(200, 3) / 3,
                alpha=1.0, batch_size=50, lr=0.1, momentum=0.9, n_iter=1, callback=Callback())


def test_self_training_stops_with_a_clear_error_when_q_is_not_finite():
    encoder = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        encoder[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"self_train: KL\(P \|\| Q\) over the data became nan at iteration 0; "
                                                 r"lower the learning rate \(lr=0.01\)"):
        self_train(encoder, nn.Parameter(torch.zeros(2, 2)), _two_groups(), alpha=1.0, batch_size=50, lr=0.01, momentum=0.9,
                   update_interval=5, tol=0.0, max_iter=20, callback=Callback())


def test_self_training_stops_when_training_drives_it_to_nan():
    torch.manual_seed(0)
    updates = []

    class Updates(Callback):
        def on_update(self, step, labels, metrics):
            updates.append(step)

    with pytest.raises(FloatingPointError, match="self_train: .* became nan at iteration"):
        self_train(nn.Sequential(nn.Linear(4, 2)), nn.Parameter(torch.tensor([[-1.0, 0.0], [1.0, 0.0]])), _two_groups(),
                   alpha=1.0, batch_size=50, lr=1e30, momentum=0.9, update_interval=2, tol=0.0, max_iter=200,
                   callback=Updates())
    assert updates and updates[0] == 0  # it ran, then stopped at the first update that was not finite


def test_one_cycle_rate_warms_up_to_the_peak_then_decays_to_zero():
    from dec_mlflow.training import WARMUP, one_cycle_lr

    rates = [one_cycle_lr(it, 1000, 0.1) for it in range(1000)]
    warm = int(WARMUP * 1000)
    assert rates[0] == pytest.approx(0.1 / warm) and rates[warm - 1] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(rates[:warm - 1], rates[1:warm]))  # rising
    assert all(a >= b for a, b in zip(rates[warm:], rates[warm + 1:]))  # then falling
    assert rates[-1] < 1e-3 and max(rates) == pytest.approx(0.1)


def test_smoothing_spreads_the_teachers_certainty():
    from dec_mlflow.training import distill

    torch.manual_seed(0)
    x = torch.randn(200, 4)
    teacher = torch.nn.functional.one_hot(torch.arange(200) % 2, 2).float()
    confidences = []
    for smoothing in (0.0, 0.4):
        torch.manual_seed(0)
        encoder = torch.nn.Sequential(torch.nn.Linear(4, 2))
        mu = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        distill(encoder, mu, x, teacher, alpha=1.0, batch_size=50, lr=0.1, momentum=0.9, n_iter=300,
                callback=Callback(), smoothing=smoothing)
        with torch.no_grad():
            confidences.append(soft_assignment(encoder(x), mu, 1.0).max(1).values.mean().item())
    assert confidences[1] < confidences[0]  # a smoothed target is not learnt as a certainty


def test_rounds_distil_the_teacher_then_each_further_round_trains_a_fresh_student_on_p():
    torch.manual_seed(0)
    x = _two_groups()
    teacher = torch.zeros(200, 2)
    teacher[:100, 1] = teacher[100:, 0] = 1.0
    students = []

    def fresh_student(round_):
        students.append(round_)
        return nn.Sequential(nn.Linear(4, 2)), nn.Parameter(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))

    options = dict(alpha=1.0, batch_size=50, lr=0.1, momentum=0.9, callback=Callback())
    rounds = distill_and_self_train(
        nn.Sequential(nn.Linear(4, 2)), nn.Parameter(torch.tensor([[-1.0, -1.0], [1.0, 1.0]])), x, teacher, rounds=2,
        distill_options=dict(n_iter=300, **options), self_train_options=dict(update_interval=10, tol=0.001, max_iter=50, **options),
        fresh_student=fresh_student)
    assert students == [1] and len(rounds.round_labels) == 2
    assert (torch.from_numpy(rounds.result.labels) == teacher.argmax(1)).float().mean() > 0.98
    assert rounds.n_iter > 0


def test_without_posteriors_there_is_one_round_of_self_training_alone():
    torch.manual_seed(0)
    x = _two_groups()
    options = dict(alpha=1.0, batch_size=50, lr=0.1, momentum=0.9, callback=Callback())
    rounds = distill_and_self_train(
        nn.Sequential(nn.Linear(4, 2)), nn.Parameter(torch.tensor([[-2.0, -2.0], [2.0, 2.0]])), x, None, rounds=3,
        distill_options={}, self_train_options=dict(update_interval=10, tol=0.001, max_iter=50, **options),
        fresh_student=lambda round_: pytest.fail("no fresh student without distillation"))
    assert len(rounds.round_labels) == 1 and rounds.result.labels.shape == (200,)


def test_self_training_runs_min_iter_before_the_tol_rule_may_stop_it():
    """Well-separated groups: the labels never change, so the paper's rule stops at the second update; with
    min_iter the run goes on to the first update at or after min_iter, and says it converged there."""
    x = _two_groups()

    def run(min_iter):
        torch.manual_seed(0)
        updates = []

        class Updates(Callback):
            def on_update(self, step, labels, metrics):
                updates.append((step, metrics["delta_label"]))

        encoder = nn.Sequential(nn.Linear(4, 2))  # z = (sum of the features / 2, 0): the groups at -4 and +4
        with torch.no_grad():
            encoder[0].weight.copy_(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
            encoder[0].bias.zero_()
        result = self_train(encoder, nn.Parameter(torch.tensor([[-4.0, 0.0], [4.0, 0.0]])), x,
                            alpha=1.0, batch_size=50, lr=0.01, momentum=0.9, update_interval=5, tol=0.001,
                            min_iter=min_iter, max_iter=200, callback=Updates())
        return result, updates

    paper, paper_updates = run(0)
    assert paper.n_iter == 5 and paper.converged and [s for s, _ in paper_updates] == [0, 5]
    longer, updates = run(23)
    assert longer.n_iter == 25 and longer.converged  # 23 is not an update step: the first update after it
    assert [s for s, _ in updates] == [0, 5, 10, 15, 20, 25] and all(d == 0.0 for _, d in updates[1:])
