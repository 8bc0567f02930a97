"""A real S3 API on loopback for the object-storage tests: moto's server (from PyPI) started as its own
process, with IAM authentication on, so that a wrong key is refused as by AWS; and a slow relay in front
of it, so that a test can act while an upload is under way.

The first three requests to the server are unauthenticated (moto's INITIAL_NO_AUTH_ACTION_COUNT): they
create an IAM user, its S3 policy and its access key, which every later request must then sign with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    process: subprocess.Popen

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a process needs to use the server (as on AWS: the standard variables)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_CONFIG_FILE": os.devnull}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(log_path) -> S3Server:
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto server did not start: {open(log_path).read()[-2000:]}") from None
            time.sleep(0.2)
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
                       region_name="us-east-1")
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]}))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)


def read_only_key(server: S3Server) -> tuple[str, str]:
    """Another user's key that may list and read every bucket but write none."""
    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint, aws_access_key_id=server.key_id,
                       aws_secret_access_key=server.secret, region_name="us-east-1")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"],
                                                 "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


class SlowRelay:
    """A TCP relay to `target` that forwards what clients send in 16 KiB pieces, `delay` seconds apart
    once a connection has sent more than 64 KiB (uploads of checkpoint shards are slow, small requests
    are not)."""

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        sent = 0
        try:
            while data := src.recv(16384):
                if slow and sent > 65536:
                    time.sleep(self.delay)
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
