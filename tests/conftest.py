import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from fqa.config import parse_config  # noqa: E402
from fqa.data import prepare_digits  # noqa: E402
from fqa.tasks.base import Task  # noqa: E402
from fqa.tasks.models import TINY_VIT  # noqa: E402,F401  (re-exported to the tests)


class TensorTask(Task):
    """A timm model on in-memory tensors (float64 for tight statistical tests)."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y

    def losses(self, ids):
        with torch.inference_mode():
            return F.cross_entropy(self.model(self.x[ids]), self.y[ids], reduction="none")

    def prepass(self, ids):
        with torch.inference_mode():
            logits = self.model(self.x[ids])
            loss = F.cross_entropy(logits, self.y[ids], reduction="none")
        return {
            "loss": loss.double().numpy(),
            "correct": (logits.argmax(-1) == self.y[ids]).numpy(),
        }

    def evaluate(self, split):
        return {}

    def train_ids(self):
        return np.arange(len(self.y))

    def autograd_gradient(self, ids) -> torch.Tensor:
        params = [p for _, p in self.trainable_parameters()]
        for p in params:
            p.grad = None
        with torch.enable_grad():
            F.cross_entropy(self.model(self.x[ids]), self.y[ids]).backward()
        grad = torch.cat([p.grad.flatten() for p in params]).clone()
        for p in params:
            p.grad = None
        return grad


def make_vit_task(mode: str = "last_blocks") -> TensorTask:
    """A random 2-block timm ViT (float64) on 8 random 16x16 images."""
    from fqa.tasks.trainable import select_trainable

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_VIT).eval().double()
    select_trainable(model, mode, 1)
    x = torch.randn(8, 1, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    return TensorTask(model, x, y)


@pytest.fixture
def vit_task():
    """Last block + head trainable."""
    return make_vit_task("last_blocks")


@pytest.fixture
def vit_head_task():
    """Head only: low estimator variance, so a small bias is visible in few draws."""
    return make_vit_task("head")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out)
    return out


@pytest.fixture
def tiny_config(digits_dir, tmp_path):
    """A fast end-to-end config: tiny ViT, few steps, no progress bar."""

    def make(**sections):
        data = {
            "run": {"name": "t", "out_dir": str(tmp_path / "runs"), "seed": 0},
            "data": {"dataset": "digits", "dir": str(digits_dir)},
            "model": {"kwargs": TINY_VIT},
            "trainable": {"mode": "last_blocks", "blocks": 1},
            "estimator": {"name": "lr", "sigma": 0.1},
            "allocator": {"name": "uniform"},
            "train": {
                "steps": 6,
                "batch_size": 16,
                "queries_per_datapoint": 4,
                "eval_every": 3,
                "checkpoint_every": 3,
                "progress": False,
            },
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return parse_config(data)

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray instance for the whole session, started on first use: 2 CPUs,
    the dashboard (the job API) bound to 127.0.0.1 on a free port. Yields its info."""
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = ray.init(
        address="local",  # a fresh instance, never a stale one
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        object_store_memory=200 * 1024**2,
        _node_ip_address="127.0.0.1",
    )
    yield {"dashboard_url": f"http://{context.dashboard_url}", "address": context.address_info}
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """A test that uses the Ray instance is a ``ray`` test whether or not it says so
    (``make test-fast`` deselects them); ``gpu`` tests skip without a CUDA device."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server for the session: moto's standalone server on
    127.0.0.1 and a free port, with IAM authentication on (wrong keys are rejected),
    one user allowed everything, and one bucket. Yields its settings."""
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_dir = tmp_path_factory.mktemp("moto")
    log = open(log_dir / "server.log", "w")
    # the first 3 requests (user, key, policy) need no credentials; all later ones do
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
        env=env,
        cwd=log_dir,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {process.returncode}") from None
                time.sleep(0.1)
        anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="test", aws_secret_access_key="test", **anonymous)
        iam.create_user(UserName="fqa")
        key = iam.create_access_key(UserName="fqa")["AccessKey"]
        iam.put_user_policy(
            UserName="fqa",
            PolicyName="all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}',
        )
        settings = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_REGION": "us-east-1",
            "FQA_S3_TIMEOUT_S": "5",
        }
        s3 = boto3.client(
            "s3",
            aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"],
            **anonymous,
        )
        s3.create_bucket(Bucket="fqa-test")
        yield {"env": settings, "bucket": "fqa-test", "endpoint": endpoint, "client": s3}
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The S3 settings in this test's environment and a fresh prefix: ``s3://bucket/<test>``."""
    import uuid

    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    prefix = f"s3://{s3_server['bucket']}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    return {**s3_server, "prefix": prefix}
