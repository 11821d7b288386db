"""Threads per worker on a shared machine (sensitivity/threads.py, issue 17)."""

from unittest import mock

from sensitivity import threads as T


def test_threads_per_worker_shares_the_free_cores():
    with mock.patch.object(T, "usable_cores", return_value=2):
        assert T.threads_per_worker(1, load=0.0) == 2        # idle: both cores
        assert T.threads_per_worker(2, load=0.0) == 1        # two workers: one each
        assert T.threads_per_worker(1, load=1.0) == 1        # one competitor: the free core only
        assert T.threads_per_worker(2, load=1.0) == 1        # never 0
        assert T.threads_per_worker(1, load=7.0) == 1
    with mock.patch.object(T, "usable_cores", return_value=16):
        assert T.threads_per_worker(3, load=1.2) == 5        # 15 free cores // 3
        for workers in range(1, 20):
            for load in (0.0, 2.5, 9.0, 30.0):
                n = T.threads_per_worker(workers, load=load)
                assert n >= 1 and (n * workers <= 16 or n == 1)


def test_local_runner_default_threads_follow_the_free_cores():
    from sensitivity.evaluation.runners import LocalRunner

    with mock.patch.object(T, "usable_cores", return_value=2), mock.patch("os.getloadavg", return_value=(1.0, 1.0, 1.0)):
        assert LocalRunner(lambda: None, workers=1).threads == 1
        assert LocalRunner(lambda: None, workers=2).threads == 1
    with mock.patch.object(T, "usable_cores", return_value=2), mock.patch("os.getloadavg", return_value=(0.0, 0.0, 0.0)):
        assert LocalRunner(lambda: None, workers=1).threads == 2
        assert LocalRunner(lambda: None, workers=1, threads=3).threads == 3  # an explicit --threads wins
