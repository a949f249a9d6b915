"""deploy/kubernetes, checked: each overlay (as shipped, in another namespace, with the monitoring
component) renders with `kubectl kustomize`, validates against the Kubernetes schemas, and every
reference between the rendered objects resolves (secrets, ConfigMap keys, mounted paths, ports,
issuers, selectors, images). Then the sidecar's pod runs offline: the proxy with the rendered
configuration and environment, cert-manager's secrets replaced by certificates with the rendered
names, and the example clients' own curl commands, which must get 200 and 403."""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtls_proxy.cli import pki
from tests.helpers import run_upstream

ROOT = Path(__file__).parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not installed; .ci/run installs it"
)

Doc = dict[str, Any]
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterIssuer"})
CRD_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")  # no schema in kubernetes-validate
CERT_MANAGER_KEYS = frozenset({"tls.crt", "tls.key", "ca.crt"})  # what a Certificate's secret holds
WORKLOADS = frozenset({"Deployment", "Job", "StatefulSet", "DaemonSet"})


# -- rendering ---------------------------------------------------------------------------------
def variant(
    tmp: Path, overlay: str, namespace: str | None = None, monitoring: bool = False
) -> Path:
    """A copy of deploy/kubernetes with *overlay* edited as its comments tell a user to: another
    `namespace:`, the monitoring component uncommented."""
    tree = tmp / "kubernetes"
    if not tree.exists():
        shutil.copytree(KUBE, tree)
    path = tree / overlay / "kustomization.yaml"
    text = path.read_text()
    if namespace is not None:
        assert text.count("\nnamespace: shop\n") == 1
        text = text.replace("\nnamespace: shop\n", f"\nnamespace: {namespace}\n")
    if monitoring:
        assert text.count("  # - ../monitoring\n") == 1
        text = text.replace("  # - ../monitoring\n", "  - ../monitoring\n")
    path.write_text(text)
    return tree / overlay


def render(path: Path) -> list[Doc]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


VARIANTS = {
    "sidecar": ("sidecar", None, False),
    "gateway": ("gateway", None, False),
    "sidecar-payments-monitoring": ("sidecar", "payments", True),
    "gateway-edge-monitoring": ("gateway", "edge", True),
}


@pytest.fixture(params=list(VARIANTS))
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, list[Doc]]:
    overlay, namespace, monitoring = VARIANTS[request.param]
    return request.param, render(variant(tmp_path, overlay, namespace, monitoring))


def allowed_images() -> dict[str, str]:
    """The images component: short name -> the image the manifests run."""
    component = yaml.safe_load((KUBE / "images" / "kustomization.yaml").read_text())
    return {i["name"]: f"{i['newName']}:{i['newTag']}" for i in component["images"]}


# -- schema validation -------------------------------------------------------------------------
def test_overlays_validate(rendered: tuple[str, list[Doc]], tmp_path: Path) -> None:
    """Built-in kinds against the Kubernetes 1.30 schemas, offline; the CRDs' objects
    (cert-manager, Prometheus Operator) are checked by the reference walk below."""
    name, docs = rendered
    builtin = [d for d in docs if not str(d["apiVersion"]).startswith(CRD_GROUPS)]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    v = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.30.0", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert v.returncode == 0, v.stdout + v.stderr
    kinds = {str(d["kind"]) for d in docs}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert {"ClusterIssuer", "Issuer", "Certificate"} <= kinds
    if "monitoring" in name:
        assert {"ServiceMonitor", "PrometheusRule"} <= kinds


# -- the reference walk ------------------------------------------------------------------------
def meta(d: Doc) -> Doc:
    m: Doc = d["metadata"]
    return m


def pods(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) for every workload."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            yield d, d["spec"]["template"]
        elif d["kind"] == "Pod":
            yield d, d


def matches(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in selector.items())


def containers(template: Doc) -> list[Doc]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_paths(text: str) -> list[str]:
    """The absolute paths a mounted YAML configuration names (cert_dir, policy_file, ...)."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node.startswith("/"):
            found.append(node)

    walk(yaml.safe_load(text))
    return found


PATH = re.compile(r"(?<![\w:/.-])(/etc/[\w./-]*\w)")


class Walk:
    """Every cross-reference of a rendered overlay; `problems` lists those that do not resolve."""

    def __init__(self, docs: list[Doc], images: dict[str, str]) -> None:
        self.docs, self.images, self.problems = docs, images, list[str]()
        self.by_kind: dict[str, dict[str, Doc]] = {}
        for d in docs:
            self.by_kind.setdefault(d["kind"], {})[meta(d)["name"]] = d
        self.certs = self.by_kind.get("Certificate", {})
        self.secrets: dict[str, tuple[frozenset[str], Doc | None]] = {
            c["spec"]["secretName"]: (CERT_MANAGER_KEYS, c) for c in self.certs.values()
        }
        for s in self.by_kind.get("Secret", {}).values():
            keys = frozenset({*s.get("data", {}), *s.get("stringData", {})})
            self.secrets[meta(s)["name"]] = (keys, None)
        self.configmaps = {
            n: dict(c.get("data", {})) for n, c in self.by_kind.get("ConfigMap", {}).items()
        }

    def fail(self, problem: str) -> None:
        self.problems.append(problem)

    def run(self) -> list[str]:
        self.namespaces()
        self.issuers()
        for workload, template in pods(self.docs):
            self.pod(f"{workload['kind']}/{meta(workload)['name']}", workload, template)
        self.services()
        self.selectors()
        self.monitors()
        return self.problems

    def namespaces(self) -> None:
        names = list(self.by_kind.get("Namespace", {}))
        if len(names) != 1:
            self.fail(f"one Namespace expected, found {names}")
            return
        ns = names[0]
        for d in self.docs:
            where, got = f"{d['kind']}/{meta(d)['name']}", meta(d).get("namespace")
            if d["kind"] in CLUSTER_SCOPED and got is not None:
                self.fail(f"{where} is cluster-scoped but has namespace {got}")
            elif d["kind"] not in CLUSTER_SCOPED and got != ns:
                self.fail(f"{where} is in namespace {got}, not {ns}")
        # The names in the certificates follow the namespace: NAME.NS.svc, spiffe://.../ns/NS/.
        for name, c in self.certs.items():
            for dns in c["spec"].get("dnsNames", []):
                parts = dns.split(".")
                if len(parts) > 2 and parts[2] == "svc" and parts[1] != ns:
                    self.fail(f"Certificate/{name} dnsName {dns} is not in namespace {ns}")
            for uri in c["spec"].get("uris", []):
                m = re.match(r"spiffe://[^/]+/ns/([^/]+)/", uri)
                if m and m[1] != ns:
                    self.fail(f"Certificate/{name} URI {uri} is not in namespace {ns}")

    def issuers(self) -> None:
        for name, c in self.certs.items():
            ref = c["spec"]["issuerRef"]
            kind = ref.get("kind", "Issuer")
            if ref.get("group", "cert-manager.io") != "cert-manager.io":
                self.fail(f"Certificate/{name}: issuer group {ref['group']}")
            if ref["name"] not in self.by_kind.get(kind, {}):
                self.fail(f"Certificate/{name}: no {kind} {ref['name']}")
        secret_names = [c["spec"]["secretName"] for c in self.certs.values()]
        if len(secret_names) != len(set(secret_names)):
            self.fail(f"two Certificates write the same secret: {sorted(secret_names)}")
        for kind in ("Issuer", "ClusterIssuer"):
            for name, issuer in self.by_kind.get(kind, {}).items():
                ca = issuer["spec"].get("ca")
                if ca is None:
                    continue
                signer = self.secrets.get(ca["secretName"], (frozenset(), None))[1]
                if signer is None or not signer["spec"].get("isCA"):
                    self.fail(f"{kind}/{name}: secret {ca['secretName']} is no CA Certificate's")

    def pod(self, where: str, workload: Doc, template: Doc) -> None:
        spec, labels = template["spec"], meta(template).get("labels", {})
        if workload["kind"] != "Pod" and workload["kind"] != "Job":
            selector = workload["spec"]["selector"]["matchLabels"]
            if not matches(selector, labels):
                self.fail(f"{where}: selector {selector} does not match its pods {labels}")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        used: set[str] = set()
        for c in containers(template):
            cwhere = f"{where} container {c['name']}"
            if c["image"] not in self.images.values():
                self.fail(f"{cwhere}: image {c['image']} is not from the images component")
            mounts = self.mounts(cwhere, c, volumes)
            used |= {m["name"] for m in c.get("volumeMounts", [])}
            self.ports_and_probes(cwhere, c)
            self.paths(cwhere, c, mounts)
            self.usages(cwhere, c, mounts)
        for name in volumes.keys() - used:
            self.fail(f"{where}: volume {name} is mounted nowhere")

    def mounts(
        self, where: str, c: Doc, volumes: dict[str, Doc]
    ) -> dict[str, tuple[Doc, set[str]]]:
        """mountPath -> (volume, the file names in it; empty for a writable emptyDir)."""
        out: dict[str, tuple[Doc, set[str]]] = {}
        for m in c.get("volumeMounts", []):
            v = volumes.get(m["name"])
            if v is None:
                self.fail(f"{where}: mounts {m['name']}, which is no volume of the pod")
                continue
            if "subPath" in m:
                self.fail(f"{where}: {m['mountPath']} uses subPath (renewals never show)")
            keys: set[str] = set()
            if "secret" in v:
                name = v["secret"]["secretName"]
                if name not in self.secrets:
                    self.fail(f"{where}: secret {name} is made by no Certificate or Secret")
                keys = set(self.secrets.get(name, (frozenset(), None))[0])
            elif "configMap" in v:
                name = v["configMap"]["name"]
                if name not in self.configmaps:
                    self.fail(f"{where}: ConfigMap {name} does not exist")
                keys = set(self.configmaps.get(name, {}))
            for item in (v.get("secret") or v.get("configMap") or {}).get("items", []):
                if item["key"] not in keys:
                    self.fail(f"{where}: volume {m['name']} has no key {item['key']}")
            out[m["mountPath"]] = (v, keys)
        return out

    def ports_and_probes(self, where: str, c: Doc) -> None:
        names = {p.get("name") for p in c.get("ports", [])}
        numbers = {p["containerPort"] for p in c.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            action = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket")
            if action is None:
                continue
            port = action["port"]
            if port not in (names if isinstance(port, str) else numbers):
                self.fail(f"{where}: {probe} port {port} is not a port of the container")

    def paths(self, where: str, c: Doc, mounts: dict[str, tuple[Doc, set[str]]]) -> None:
        """Every /etc path in the command, the arguments, the environment and a mounted YAML
        configuration is a mounted directory or a file in one."""
        words = [*c.get("command", []), *c.get("args", [])]
        words += [e.get("value", "") for e in c.get("env", [])]
        found = [p for w in words for p in PATH.findall(str(w))]
        for path in list(found):
            resolved = self.resolve(path, mounts)
            if resolved is not None and path.endswith((".yaml", ".yml")):
                volume, key = resolved
                if "configMap" in volume and key is not None:
                    text = self.configmaps.get(volume["configMap"]["name"], {}).get(key, "")
                    found += config_paths(text)
        for path in found:
            if self.resolve(path, mounts) is None:
                self.fail(f"{where}: {path} is not in a mounted volume")

    @staticmethod
    def resolve(
        path: str, mounts: dict[str, tuple[Doc, set[str]]]
    ) -> tuple[Doc, str | None] | None:
        """(volume, file name) for a file, (volume, None) for a mounted directory; None: neither."""
        for mount, (volume, keys) in mounts.items():
            if path == mount:
                return volume, None
            parent, _, name = path.rpartition("/")
            if parent == mount and name in keys:
                return volume, name
        return None

    def usages(self, where: str, c: Doc, mounts: dict[str, tuple[Doc, set[str]]]) -> None:
        """A certificate presented by `serve` is a server certificate; by `client` or curl, a
        client certificate."""
        words = [*c.get("command", []), *c.get("args", [])]
        role = "server auth" if words[:1] == ["serve"] else "client auth"
        for volume, _ in mounts.values():
            secret = (volume.get("secret") or {}).get("secretName")
            cert = self.secrets.get(secret or "", (frozenset(), None))[1]
            if cert is not None and role not in cert["spec"].get("usages", []):
                self.fail(f"{where}: Certificate/{meta(cert)['name']} lacks the usage {role}")

    def services(self) -> None:
        for name, svc in self.by_kind.get("Service", {}).items():
            selector = svc["spec"].get("selector", {})
            selected = [t for _, t in pods(self.docs) if matches(selector, meta(t).get("labels"))]
            if not selected:
                self.fail(f"Service/{name}: selector {selector} matches no pod")
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                for t in selected:
                    ports = [p for c in containers(t) for p in c.get("ports", [])]
                    known = {p.get("name") for p in ports} | {p["containerPort"] for p in ports}
                    if target not in known:
                        self.fail(f"Service/{name}: a selected pod has no port {target}")

    def selectors(self) -> None:
        for name, pdb in self.by_kind.get("PodDisruptionBudget", {}).items():
            selector = pdb["spec"]["selector"]["matchLabels"]
            if not any(matches(selector, meta(t).get("labels")) for _, t in pods(self.docs)):
                self.fail(f"PodDisruptionBudget/{name}: selector {selector} matches no pod")
        for name, hpa in self.by_kind.get("HorizontalPodAutoscaler", {}).items():
            ref = hpa["spec"]["scaleTargetRef"]
            if ref["name"] not in self.by_kind.get(ref["kind"], {}):
                self.fail(f"HorizontalPodAutoscaler/{name}: no {ref['kind']} {ref['name']}")

    def monitors(self) -> None:
        for name, sm in self.by_kind.get("ServiceMonitor", {}).items():
            selector = sm["spec"]["selector"]["matchLabels"]
            services = [
                s
                for s in self.by_kind.get("Service", {}).values()
                if matches(selector, meta(s).get("labels"))
            ]
            if not services:
                self.fail(f"ServiceMonitor/{name}: selector {selector} matches no Service")
            for endpoint in sm["spec"]["endpoints"]:
                for s in services:
                    if endpoint["port"] not in {p.get("name") for p in s["spec"]["ports"]}:
                        self.fail(f"ServiceMonitor/{name}: Service has no port {endpoint['port']}")


def test_every_reference_resolves(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    assert Walk(docs, allowed_images()).run() == []


def test_prometheusrule_is_alerts_yaml(tmp_path: Path) -> None:
    """The component's PrometheusRule holds exactly deploy/monitoring/alerts.yaml's groups."""
    rule = yaml.safe_load((KUBE / "monitoring" / "prometheusrule.yaml").read_text())
    alerts = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == alerts["groups"], (
        "monitoring/prometheusrule.yaml is out of date: run scripts/sync-prometheusrule"
    )
    # The script that writes it reproduces the committed file.
    copy_root = tmp_path / "repo"
    for part in ("scripts/sync-prometheusrule", "deploy/monitoring/alerts.yaml"):
        (copy_root / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, copy_root / part)
    (copy_root / "deploy/kubernetes/monitoring").mkdir(parents=True)
    subprocess.run([sys.executable, str(copy_root / "scripts/sync-prometheusrule")], check=True)
    written = copy_root / "deploy/kubernetes/monitoring/prometheusrule.yaml"
    assert written.read_text() == (KUBE / "monitoring" / "prometheusrule.yaml").read_text()


def test_images_are_named_once() -> None:
    """The manifests name images by the component's short names only, and the proxy's tag is
    the package's version."""
    from mtls_proxy import __version__

    images = allowed_images()
    assert images["mtls-proxy"].endswith(f":{__version__}")
    for path in KUBE.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:- )?image:\s*(\S+)", line)
            if m:
                assert m[1] in images, f"{path}: image {m[1]} is not a short name of images/"


# The walk itself: each broken reference is reported (the checks above cannot pass vacuously).
def _secret(docs: list[Doc]) -> None:
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    deploy["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] = "shop-api-mtls-x"


def _configmap_key(docs: list[Doc]) -> None:
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cm["data"] = {"other.yaml": cm["data"]["config.yaml"]}


def _config_path(docs: list[Doc]) -> None:
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("/etc/mtls\n", "/etc/tls\n")


def _probe_port(docs: list[Doc]) -> None:
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    proxy = next(c for c in deploy["spec"]["template"]["spec"]["containers"] if "ports" in c)
    proxy["ports"][1]["name"] = "metrics"


def _service_port(docs: list[Doc]) -> None:
    svc = next(d for d in docs if d["kind"] == "Service")
    svc["spec"]["ports"][0]["targetPort"] = "https"


def _issuer(docs: list[Doc]) -> None:
    cert = next(d for d in docs if d["kind"] == "Certificate" and not d["spec"].get("isCA"))
    cert["spec"]["issuerRef"]["name"] = "mtls-ca-x"


def _ca_secret(docs: list[Doc]) -> None:
    issuer = next(d for d in docs if d["kind"] == "Issuer")
    issuer["spec"]["ca"]["secretName"] = "mtls-ca"


def _selector(docs: list[Doc]) -> None:
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    pdb["spec"]["selector"]["matchLabels"] = {"app": "shop-apl"}


def _pod_labels(docs: list[Doc]) -> None:
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    deploy["spec"]["template"]["metadata"]["labels"]["app"] = "shop"


def _image(docs: list[Doc]) -> None:
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/example/app:1"


def _namespace(docs: list[Doc]) -> None:
    cert = next(d for d in docs if d["kind"] == "Certificate" and d["spec"].get("dnsNames"))
    cert["spec"]["dnsNames"][1] = cert["spec"]["dnsNames"][1].replace(".shop.", ".default.")


def _usage(docs: list[Doc]) -> None:
    cert = next(d for d in docs if d["kind"] == "Certificate" and d["spec"].get("dnsNames"))
    cert["spec"]["usages"] = ["server auth", "digital signature"]  # the egress needs client auth


def _mount(docs: list[Doc]) -> None:
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    egress = deploy["spec"]["template"]["spec"]["containers"][-1]
    egress["volumeMounts"][0]["mountPath"] = "/etc/mtls-egress"


MUTATIONS: dict[str, Callable[[list[Doc]], None]] = {
    f.__name__.strip("_"): f
    for f in (
        _secret,
        _configmap_key,
        _config_path,
        _probe_port,
        _service_port,
        _issuer,
        _ca_secret,
        _selector,
        _pod_labels,
        _image,
        _namespace,
        _usage,
        _mount,
    )
}


@pytest.fixture(scope="module")
def sidecar_docs() -> list[Doc]:
    return render(KUBE / "sidecar")


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_walk_reports_a_broken_reference(sidecar_docs: list[Doc], mutation: str) -> None:
    docs = copy.deepcopy(sidecar_docs)
    assert Walk(docs, allowed_images()).run() == []
    MUTATIONS[mutation](docs)
    assert Walk(docs, allowed_images()).run() != []


# -- the sidecar's pod, offline ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


EKU = {
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
}


def secrets_as_cert_manager_writes_them(docs: list[Doc], d: Path) -> dict[str, Path]:
    """secretName -> a directory with tls.crt, tls.key and ca.crt, issued by a throwaway CA with
    each Certificate's DNS names, URIs and usages."""
    _, inter = pki.init_pki(d / "ca")
    out = {}
    for c in (d for d in docs if d["kind"] == "Certificate" and not d["spec"].get("isCA")):
        spec = c["spec"]
        issued = pki.issue(
            inter,
            "server",
            meta(c)["name"],
            dns=spec.get("dnsNames", []),
            uris=spec.get("uris", []),
            eku=[EKU[u] for u in spec["usages"] if u in EKU],
        )
        secret = d / spec["secretName"]
        secret.mkdir()
        (secret / "tls.crt").write_bytes(issued.cert_pem())
        pki.write_private(secret / "tls.key", issued.key_pem(None))
        shutil.copy(d / "ca" / "ca.crt", secret / "ca.crt")
        out[spec["secretName"]] = secret
    return out


def remap(text: str, mounts: dict[str, Path]) -> str:
    """Mount paths in *text* replaced by the local directories standing for them."""
    names = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, names)) + r")(?=[/\s\"']|$)")
    return pattern.sub(lambda m: str(mounts[m[1]]), text)


def _egress_leg(spec: Doc, secrets: dict[str, Path], serve_port: int) -> tuple[int, str, str]:
    """Run the mtls-egress container's args (its secret mounts remapped), its target pointed at
    the pod's own serve on this machine under a name serve's certificate carries; one curl
    through it."""
    egress = next(c for c in spec["containers"] if c["name"] == "mtls-egress")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {
        m["mountPath"]: secrets[volumes[m["name"]]["secret"]["secretName"]]
        for m in egress["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    port = free_port()
    argv = [
        sys.executable, "-m", "mtls_proxy", *(remap(a, mounts) for a in egress["args"]),
        # Later flags win: only the addresses are this machine's.
        "--listen", f"127.0.0.1:{port}", "--admin", "off",
        "--target", f"127.0.0.1:{serve_port}", "--override-server-name", "shop-api",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env={"PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines, deadline = [""], time.monotonic() + 20
        while time.monotonic() < deadline and '"msg": "ready"' not in lines[-1]:
            lines.append(proc.stderr.readline())
            if proc.poll() is not None and not lines[-1]:
                break
        assert '"msg": "ready"' in lines[-1], "".join(lines)
        r = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "HTTP %{http_code}", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return r.returncode, r.stdout.strip(), r.stderr
    finally:
        proc.terminate()
        proc.wait(20)


def test_sidecar_pod_offline(sidecar_docs: list[Doc], tmp_path: Path) -> None:
    docs = sidecar_docs
    secrets = secrets_as_cert_manager_writes_them(docs, tmp_path / "secrets")
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    proxy = next(c for c in spec["containers"] if c["name"] == "mtls-proxy")
    app = next(c for c in spec["containers"] if c["name"] == "app")
    env = {e["name"]: e["value"] for e in proxy["env"]}
    # The proxy forwards to where the app listens.
    assert f"-listen={env['MTLS_PROXY_UPSTREAM'].removeprefix('http://')}" in app["args"]

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts: dict[str, Path] = {}
    for m in proxy["volumeMounts"]:
        v, local = volumes[m["name"]], tmp_path / "mounts" / m["name"]
        if "secret" in v:
            local = secrets[v["secret"]["secretName"]]
        else:
            local.mkdir(parents=True)
        mounts[m["mountPath"]] = local
    for m in proxy["volumeMounts"]:
        v = volumes[m["name"]]
        if "configMap" in v:
            cm = next(d for d in docs if d["kind"] == "ConfigMap")
            for key, text in cm["data"].items():
                (mounts[m["mountPath"]] / key).write_text(remap(text, mounts))

    listen, admin = free_port(), free_port()
    with run_upstream() as up:
        env.update(
            MTLS_PROXY_UPSTREAM=f"http://127.0.0.1:{up.port}",
            MTLS_PROXY_LISTEN=f"127.0.0.1:{listen}",
            MTLS_PROXY_ADMIN=f"127.0.0.1:{admin}",
        )
        argv = [sys.executable, "-m", "mtls_proxy", *(remap(a, mounts) for a in proxy["args"])]
        proc = subprocess.Popen(
            argv, env={"PATH": "/usr/bin:/bin", **env}, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stderr is not None
            line, deadline = "", time.monotonic() + 20
            while time.monotonic() < deadline and '"msg": "ready"' not in line:
                line = proc.stderr.readline()
            assert '"msg": "ready"' in line, line
            results = {}
            for job in (d for d in docs if d["kind"] == "Job"):
                pod = job["spec"]["template"]["spec"]
                (curl,) = pod["containers"]
                job_mounts = {
                    m["mountPath"]: secrets[
                        {v["name"]: v for v in pod["volumes"]}[m["name"]]["secret"]["secretName"]
                    ]
                    for m in curl["volumeMounts"]
                }
                script = remap(curl["args"][0], job_mounts)
                # The Job's own URL and name check; only the address is this machine's.
                script = script.replace("curl ", f"curl --connect-to ::127.0.0.1:{listen} ", 1)
                r = subprocess.run(
                    [*curl["command"], script], capture_output=True, text=True, timeout=60
                )
                results[meta(job)["name"]] = (r.returncode, r.stdout.strip(), r.stderr)
            results["egress"] = _egress_leg(spec, secrets, listen)
        finally:
            proc.terminate()
            proc.wait(20)
    assert results["shop-frontend-curl"][:2] == (0, "HTTP 200"), results
    assert results["shop-reports-curl"][:2] == (0, "HTTP 403"), results
    assert '"error": "forbidden"' in results["shop-reports-curl"][2]
    # The egress container, with its own args, reached the pod's serve with the pod's certificate
    # and verified serve's (name and chain): serve answered (403: the pod's own identity is not
    # on its allow-list), which it can only do after an mTLS handshake with a certificate it trusts.
    assert results["egress"][:2] == (0, "HTTP 403"), results["egress"]
    # The app saw the frontend's identity, injected by the proxy.
    (seen,) = up.seen
    spiffe = {k.lower(): v for k, v in seen.headers}["x-client-spiffe-id"]
    assert spiffe == "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.mark.parametrize("overlay", ["sidecar", "gateway"])
def test_overlay_hardening(overlay: str) -> None:
    """Non-root, read-only, no capabilities, probes on the admin port, a drain that finishes."""
    docs = render(KUBE / overlay)
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["allowPrivilegeEscalation"] is False
    proxy = next(c for c in pod["containers"] if c["name"] == "mtls-proxy")
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    )
    assert pod["terminationGracePeriodSeconds"] > config["shutdown_grace"]  # the drain finishes
    if overlay == "sidecar":
        services = [d for d in docs if d["kind"] == "Service"]
        assert [p["port"] for s in services for p in s["spec"]["ports"]] == [8443]
        app = next(c for c in pod["containers"] if c["name"] == "app")
        assert "-listen=127.0.0.1:8080" in app["args"]  # reachable through the proxy alone
        # Both directions: ingress `serve`, egress `client` (SPEC section 11) on loopback.
        egress = next(c for c in pod["containers"] if c["name"] == "mtls-egress")
        assert egress["args"][:3] == ["client", "--listen", "127.0.0.1:15001"]
        assert egress["args"][egress["args"].index("--admin") + 1].startswith("127.0.0.1:")
    else:
        assert any(d["kind"] == "HorizontalPodAutoscaler" for d in docs)
