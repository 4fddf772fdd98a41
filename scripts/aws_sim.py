#!/usr/bin/env python3
"""The AWS instance simulator: stands between dryrun and moto and plays the part of EC2
instances and the SSM agent for real.

    python3 scripts/aws_sim.py --upstream http://127.0.0.1:MOTO_PORT --port PORT --dir DIR

- RunInstances goes to moto; then the instance's user data runs in a sandbox that stands in for
  the instance: its own mount namespace (fresh /opt, /var/lib, /var/log and /tmp, kept in
  DIR/INSTANCE_ID/ on the host), its own network namespace in which the private address moto
  assigned is a local address (so a check that curls it reaches the release on "the instance",
  and nothing is ever sent to that address on the host network), its own PID namespace (so
  that terminating the instance ends everything in it) and its own host name.
- From inside the sandbox the emulator stays reachable at the loopback address dryrun presigned
  the release URL with (the simulator's, or that of a proxy in front of it): for each
  `http://127.0.0.1:PORT/` the user data names, a relay on the sandbox's loopback hands every
  connection over a Unix socket to the simulator, which connects it to the same port on the
  host's loopback. The sandbox has no other network.
- SendCommand (AWS-RunShellScript) goes to moto (which records it and names the command), then
  its commands run in the instance's sandbox as the SSM agent would run them: one `sh` script,
  the `executionTimeout` enforced (status TimedOut); GetCommandInvocation answers with the real
  status, response code and output, cut at SSM's limits (24,000 characters of standard output,
  8,000 of standard error).
- TerminateInstances goes to moto, then ends the instance's sandbox and everything in it.
- Every other request passes through to moto unchanged.

Latencies, to measure time to verdict against a cloud's pace (scripts/bench-aws-verdict):
`--latency-ms N` holds every request N ms before forwarding it; `--rds-delay S` keeps a DB
instance or cluster that was just restored or created `creating` in DescribeDBInstances and
DescribeDBClusters for S seconds; `--boot-delay S` boots an instance S seconds after
RunInstances (its user data runs then) and until then refuses SendCommand to it with
`InvalidInstanceId`, as SSM does before the agent registers.

`GET /__sim/instances` lists the live sandboxes (for tests). SIGTERM and SIGINT end every
sandbox and the simulator. Needs root (namespaces), `unshare`, `nsenter`, `ip` and `mount`
(util-linux, iproute2); the sandboxes see the host's programs (sh, curl, tar, python3).

The sandbox's network view is the part that protects the rules of this workplace: nothing
inside it can reach anything but its own loopback (where the private address lives) and, via
the relay, the emulator.
"""

import argparse
import base64
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import re
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET

STDOUT_LIMIT = 24000
STDERR_LIMIT = 8000
INSTANCE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "content-length"}


def log(msg):
    sys.stderr.write(f"aws-sim: {msg}\n")
    sys.stderr.flush()


def pump(a, b):
    """Copies a → b until EOF, then half-closes b."""
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def bridge(a, b):
    t = threading.Thread(target=pump, args=(b, a), daemon=True)
    t.start()
    pump(a, b)
    t.join()
    for s in (a, b):
        try:
            s.close()
        except OSError:
            pass


class Invocation:
    def __init__(self, command_id, instance_id, comment):
        self.command_id = command_id
        self.instance_id = instance_id
        self.comment = comment
        self.status = "InProgress"
        self.code = -1
        self.stdout = ""
        self.stderr = ""
        self.started = time.time()
        self.ended = None

    def answer(self):
        def iso(t):
            return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t)) if t else ""
        return {
            "CommandId": self.command_id,
            "InstanceId": self.instance_id,
            "Comment": self.comment,
            "DocumentName": "AWS-RunShellScript",
            "DocumentVersion": "$DEFAULT",
            "PluginName": "aws:runShellScript",
            "ResponseCode": self.code,
            "ExecutionStartDateTime": iso(self.started),
            "ExecutionElapsedTime": "",
            "ExecutionEndDateTime": iso(self.ended),
            "Status": self.status,
            "StatusDetails": self.status,
            "StandardOutputContent": self.stdout,
            "StandardOutputUrl": "",
            "StandardErrorContent": self.stderr,
            "StandardErrorUrl": "",
        }


class Instance:
    def __init__(self, sim, instance_id, ip, user_data):
        self.id = instance_id
        self.ip = ip
        self.dir = os.path.join(sim.dir, instance_id)
        for d in ("opt", "varlib", "varlog", "tmp"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        with open(os.path.join(self.dir, "user-data"), "wb") as f:
            f.write(user_data)
        self.log = open(os.path.join(self.dir, "sandbox.log"), "ab")
        ports = {sim.port}
        ports.update(int(p) for p in re.findall(rb"http://127\.0\.0\.1:(\d+)/", user_data))
        with sim.lock:
            sim.relay_ports.update(ports)
        cmd = ["setpriv", "--pdeathsig", "KILL",
               "unshare", "--net", "--mount", "--pid", "--uts", "--fork", "--kill-child",
               "--mount-proc",
               sys.executable, os.path.abspath(__file__), "instance-init",
               "--dir", self.dir, "--ip", ip, "--ports", ",".join(map(str, sorted(ports))),
               "--relay", sim.relay_path, "--id", instance_id]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=INSTANCE_ENV)
        self.init_pid = None
        deadline = time.time() + 10
        while time.time() < deadline and self.init_pid is None:
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    kids = f.read().split()
                if kids:
                    self.init_pid = int(kids[0])
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        if self.init_pid is None:
            raise RuntimeError(f"the sandbox of {instance_id} did not start; see {self.log.name}")
        # Ready when its init has written the marker (mounts, address, relay in place).
        ready = os.path.join(self.dir, "ready")
        while time.time() < deadline and not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sandbox of {instance_id} exited; see {self.log.name}")
            time.sleep(0.01)
        log(f"instance {instance_id} ({ip}) booted in its sandbox (init pid {self.init_pid})")

    def alive(self):
        return self.proc.poll() is None

    def run(self, script, timeout, inv):
        """Runs a Run Command script inside the sandbox, as the SSM agent would."""
        work = f"/var/lib/amazon/ssm/{self.id}/document/orchestration/{inv.command_id}/awsrunShellScript/0.awsrunShellScript"
        host_work = os.path.join(self.dir, "varlib", work[len("/var/lib/"):])
        os.makedirs(host_work, exist_ok=True)
        with open(os.path.join(host_work, "_script.sh"), "w") as f:
            f.write(script)
        cmd = ["nsenter", "-t", str(self.init_pid), "-n", "-m", "-p", "-u", "--",
               "sh", "-c", f"cd '{work}' && exec sh ./_script.sh"]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=INSTANCE_ENV, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
            inv.code = p.returncode
            inv.status = "Success" if p.returncode == 0 else "Failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            out, err = p.communicate()
            inv.code = -1
            inv.status = "TimedOut"
        inv.stdout = out.decode("utf-8", "replace")[:STDOUT_LIMIT]
        inv.stderr = err.decode("utf-8", "replace")[:STDERR_LIMIT]
        inv.ended = time.time()

    def terminate(self):
        if self.init_pid:
            try:
                os.kill(self.init_pid, signal.SIGKILL)  # pid 1 of its PID namespace: all of it
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        log(f"instance {self.id} terminated: its sandbox is gone")


class Sim:
    def __init__(self, upstream, port, directory, latency=0.0, rds_delay=0.0, boot_delay=0.0):
        u = urllib.parse.urlparse(upstream)
        self.up_host, self.up_port = u.hostname, u.port
        self.port = port
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.relay_path = os.path.join(self.dir, "relay.sock")
        self.relay_ports = {port}
        self.instances = {}
        self.invocations = {}
        self.lock = threading.Lock()
        self.latency = latency
        self.rds_delay = rds_delay
        self.boot_delay = boot_delay
        # instance id -> time its boot starts; DB identifier -> time it becomes available
        self.booting = {}
        self.rds_busy = {}

    # --- the relay from the sandboxes to the emulator ---
    def serve_relay(self):
        if os.path.exists(self.relay_path):
            os.unlink(self.relay_path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.relay_path)
        srv.listen(64)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=self.relay_one, args=(conn,), daemon=True).start()

    def relay_one(self, conn):
        """A sandbox's connection: a line with the loopback port it was made to, then data.
        Only the ports the instances' user data named (and the simulator's) are served."""
        header = b""
        while not header.endswith(b"\n") and len(header) < 16:
            b = conn.recv(1)
            if not b:
                break
            header += b
        try:
            port = int(header.strip())
            with self.lock:
                allowed = port in self.relay_ports
            if not allowed:
                raise ValueError(f"port {port} is not relayed")
            up = socket.create_connection(("127.0.0.1", port))
        except (ValueError, OSError) as e:
            log(f"relay: {e}")
            conn.close()
            return
        bridge(conn, up)

    # --- the emulator ---
    def forward(self, method, path, headers, body):
        c = http.client.HTTPConnection(self.up_host, self.up_port, timeout=120)
        h = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        if body or method in ("POST", "PUT", "PATCH"):
            h["Content-Length"] = str(len(body))
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        out_headers = [(k, v) for k, v in r.getheaders() if k.lower() not in HOP_BY_HOP]
        c.close()
        return r.status, out_headers, data

    # --- EC2 ---
    def run_instances(self, form, status, data):
        if status != 200:
            return
        ud = form.get("UserData", [""])[0]
        user_data = base64.b64decode(ud) if ud else b""
        root = ET.fromstring(data)
        started = []
        for item in root.iter():
            if not item.tag.endswith("instancesSet"):
                continue
            for inst in item:
                iid = ip = None
                for child in inst:
                    if child.tag.endswith("instanceId"):
                        iid = child.text
                    elif child.tag.endswith("privateIpAddress"):
                        ip = child.text
                if not iid or not ip:
                    continue
                with self.lock:
                    if iid in self.instances or iid in self.booting:
                        continue
                    # Until it has booted, SendCommand to it is refused (InvalidInstanceId).
                    self.booting[iid] = time.time() + self.boot_delay
                up = threading.Event()
                started.append(up)
                threading.Thread(target=self.boot, args=(iid, ip, user_data, up),
                                 daemon=True).start()
        # Without a boot delay the instance is up when RunInstances answers: the agent never
        # refuses a command, so a run sends each SendCommand exactly once and the number of
        # side-effect points a run passes does not depend on how fast the sandbox starts
        # (tests/aws_faults.rs crashes at each of them by number).
        if self.boot_delay <= 0:
            for up in started:
                up.wait(30)

    def boot(self, iid, ip, user_data, up):
        try:
            with self.lock:
                at = self.booting.get(iid)
            if at is None:
                return
            time.sleep(max(0.0, at - time.time()))
            try:
                instance = Instance(self, iid, ip, user_data)
            except Exception as e:  # the launch still answered; the instance never boots
                log(f"instance {iid}: {e}")
                with self.lock:
                    self.booting.pop(iid, None)
                return
            with self.lock:
                # Terminated while it booted: it never comes up.
                if self.booting.pop(iid, None) is None:
                    instance.terminate()
                    return
                self.instances[iid] = instance
        finally:
            up.set()
        # The sandbox dies with the thread that started it (setpriv --pdeathsig): this one
        # stays until the instance is terminated, whatever becomes of the request's thread.
        instance.proc.wait()

    def still_booting(self, ids):
        with self.lock:
            return [i for i in ids if i in self.booting]

    # --- RDS ---
    def rds_created(self, form, status, action):
        if status != 200 or self.rds_delay <= 0:
            return
        key = "DBClusterIdentifier" if action == "RestoreDBClusterToPointInTime" else "DBInstanceIdentifier"
        ident = form.get(key, [""])[0]
        if ident:
            with self.lock:
                self.rds_busy[ident.lower()] = time.time() + self.rds_delay

    def rds_describe(self, data):
        """Says `creating` for what was restored or created less than --rds-delay ago."""
        now = time.time()
        with self.lock:
            busy = {k for k, until in self.rds_busy.items() if until > now}
        if not busy:
            return data
        text = data.decode("utf-8")

        def one(m):
            block = m.group(0)
            ident = re.search(rf"<{m.group(1)}Identifier>([^<]*)<", block)
            if ident and ident.group(1).lower() in busy:
                block = re.sub(r"<(DBInstanceStatus|Status)>available<", r"<\1>creating<", block, count=1)
            return block

        text = re.sub(r"<(DBInstance|DBCluster)>.*?</\1>", one, text, flags=re.S)
        return text.encode("utf-8")

    def terminate_instances(self, form):
        ids = [v[0] for k, v in form.items() if k.startswith("InstanceId.")]
        for iid in ids:
            with self.lock:
                self.booting.pop(iid, None)
                instance = self.instances.pop(iid, None)
            if instance:
                instance.terminate()

    # --- SSM ---
    def send_command(self, req, data):
        answer = json.loads(data)
        command_id = answer.get("Command", {}).get("CommandId")
        if not command_id:
            return
        params = req.get("Parameters", {})
        script = "\n".join(params.get("commands", []))
        timeout = int((params.get("executionTimeout") or ["3600"])[0])
        for iid in req.get("InstanceIds", []):
            with self.lock:
                instance = self.instances.get(iid)
            if not instance:
                continue
            inv = Invocation(command_id, iid, req.get("Comment", ""))
            with self.lock:
                self.invocations[(command_id, iid)] = inv
            threading.Thread(target=instance.run, args=(script, timeout, inv), daemon=True).start()

    def get_invocation(self, req):
        with self.lock:
            inv = self.invocations.get((req.get("CommandId"), req.get("InstanceId")))
        return inv.answer() if inv else None

    def shutdown(self):
        with self.lock:
            instances = list(self.instances.values())
            self.instances.clear()
        for i in instances:
            i.terminate()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sim = None

    def log_message(self, *args):
        pass

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def handle_any(self):
        sim = self.sim
        body = self.body()
        target = self.headers.get("X-Amz-Target", "")
        if self.path.startswith("/__sim/instances"):
            with sim.lock:
                live = [{"id": i.id, "ip": i.ip, "pid": i.init_pid, "alive": i.alive()}
                        for i in sim.instances.values()]
            return self.reply(200, [("Content-Type", "application/json")],
                              json.dumps({"instances": live}).encode())
        if target == "AmazonSSM.GetCommandInvocation":
            answer = sim.get_invocation(json.loads(body or b"{}"))
            if answer is not None:
                return self.reply(200, [("Content-Type", "application/x-amz-json-1.1"),
                                        ("x-amzn-RequestId", str(uuid.uuid4()))],
                                  json.dumps(answer).encode())
        form = {}
        ctype = self.headers.get("Content-Type", "")
        if self.command == "POST" and "x-www-form-urlencoded" in ctype:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        action = form.get("Action", [""])[0]
        if sim.latency > 0 and not self.path.startswith("/moto-api"):
            time.sleep(sim.latency)
        if target == "AmazonSSM.SendCommand":
            waiting = sim.still_booting(json.loads(body or b"{}").get("InstanceIds", []))
            if waiting:
                msg = {"__type": "InvalidInstanceId",
                       "message": f"Instances {waiting} not in a valid state for account"}
                return self.reply(400, [("Content-Type", "application/x-amz-json-1.1"),
                                        ("x-amzn-RequestId", str(uuid.uuid4()))],
                                  json.dumps(msg).encode())
        status, headers, data = sim.forward(self.command, self.path, dict(self.headers), body)
        try:
            if action == "RunInstances":
                sim.run_instances(form, status, data)
            elif action == "TerminateInstances" and status == 200:
                sim.terminate_instances(form)
            elif target == "AmazonSSM.SendCommand" and status == 200:
                sim.send_command(json.loads(body or b"{}"), data)
            elif action in ("RestoreDBInstanceFromDBSnapshot", "CreateDBInstance",
                            "RestoreDBClusterToPointInTime"):
                sim.rds_created(form, status, action)
            elif action in ("DescribeDBInstances", "DescribeDBClusters") and status == 200:
                data = sim.rds_describe(data)
        except Exception as e:  # the emulator's answer still goes back
            log(f"{action or target}: {e}")
        self.reply(status, headers, data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any


def instance_init(args):
    """PID 1 of an instance's sandbox (new mount, network, PID and UTS namespaces)."""
    d = args.dir
    # The instance's directory and the relay's socket may be under /tmp, which the sandbox
    # gets its own of: keep handles on both, and the user data, before mounting.
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    rfd = os.open(os.path.dirname(args.relay), os.O_RDONLY | os.O_DIRECTORY)
    relay_path = f"/proc/self/fd/{rfd}/{os.path.basename(args.relay)}"
    with open(os.path.join(d, "user-data"), "rb") as f:
        user_data = f.read()
    for src, dst in (("opt", "/opt"), ("varlib", "/var/lib"), ("varlog", "/var/log"),
                     ("tmp", "/tmp")):
        subprocess.run(["mount", "--bind", os.path.join(d, src), dst], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{args.ip}/32", "dev", "lo"], check=True)
    subprocess.run(["hostname", "ip-" + args.ip.replace(".", "-")], check=False)
    # The emulator, at the loopback addresses the user data names (the presigned release URL).
    def relay(srv, port):
        while True:
            conn, _ = srv.accept()
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(relay_path)
                up.sendall(f"{port}\n".encode())
            except OSError:
                conn.close()
                continue
            threading.Thread(target=bridge, args=(conn, up), daemon=True).start()

    for port in map(int, args.ports.split(",")):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(64)
        threading.Thread(target=relay, args=(srv, port), daemon=True).start()
    # cloud-init: the user data is kept in /var/lib/cloud and runs as root at boot, its output
    # in /var/log/cloud-init-output.log.
    os.makedirs("/var/lib/cloud/instance", exist_ok=True)
    script = "/var/lib/cloud/instance/user-data.txt"
    with open(script, "wb") as f:
        f.write(user_data)
    out = open("/var/log/cloud-init-output.log", "ab")
    subprocess.Popen(["sh", script], stdin=subprocess.DEVNULL,
                     stdout=out, stderr=subprocess.STDOUT, cwd="/", env=INSTANCE_ENV)
    os.close(os.open("ready", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
    # As PID 1, reap every orphan until the instance is terminated.
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    init = sub.add_parser("instance-init")
    for a in ("--dir", "--ip", "--relay", "--id", "--ports"):
        init.add_argument(a, required=True)
    p.add_argument("--upstream", help="the emulator, http://127.0.0.1:PORT")
    p.add_argument("--port", type=int, default=0, help="where to listen on 127.0.0.1")
    p.add_argument("--dir", help="where the instances' files go")
    p.add_argument("--latency-ms", type=float, default=0, help="added to every request")
    p.add_argument("--rds-delay", type=float, default=0,
                   help="seconds a restored or created DB instance or cluster stays `creating`")
    p.add_argument("--boot-delay", type=float, default=0,
                   help="seconds from RunInstances until the instance boots and accepts SSM commands")
    args = p.parse_args()
    if args.cmd == "instance-init":
        return instance_init(args)
    if not (args.upstream and args.dir):
        p.error("--upstream and --dir are required")
    if os.geteuid() != 0:
        sys.exit("aws-sim: needs root (it makes mount, network and PID namespaces)")
    for tool in ("unshare", "nsenter", "ip", "mount", "setpriv"):
        if not shutil.which(tool):
            sys.exit(f"aws-sim: `{tool}` not found (util-linux, iproute2)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    sim = Sim(args.upstream, server.server_address[1], args.dir,
              args.latency_ms / 1000.0, args.rds_delay, args.boot_delay)
    Handler.sim = sim
    threading.Thread(target=sim.serve_relay, daemon=True).start()

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"AWS_ENDPOINT_URL=http://127.0.0.1:{sim.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        sim.shutdown()
        log("stopped; every sandbox is gone")


if __name__ == "__main__":
    main()
