#!/usr/bin/env python3
"""Write the committed seed corpus (fuzz/corpus/TARGET/), taken from the unit tests' inputs.

Run from anywhere: python3 fuzz/seeds.py. Campaigns (scripts/fuzz.sh) grow their own corpus
in fuzz/work/, which is not committed; these seeds stay small on purpose.
"""
import hashlib, json, os, random, struct, sys

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
random.seed(13)


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def rand_bytes(target, n=6, size=256):
    """Structured targets read their values from any bytes: a few random inputs start them."""
    for _ in range(n):
        put(target, bytes(random.getrandbits(8) for _ in range(random.randint(16, size))))


# profile: the bundled profiles and the forms of target.rs's tests.
for name in sorted(os.listdir(os.path.join(REPO, "profiles"))):
    put("profile", open(os.path.join(REPO, "profiles", name), "rb").read())
put("profile", "# header\n\nexample.com  # inline\n  198.51.100.7\n+ *.example.org\n")
put("profile", "\n".join([
    "Example.COM.", "example.com:443/TCP", "198.51.100.7:22/tcp", "198.51.100.0/24:53/udp",
    "2001:db8::/32", "[2001:db8::1]:443", "[2001:db8::/48]:443/udp", "_dmarc.example.com",
    "198.51.100.7/24", "10.1.2.3", "fd00:5eed::1", "::ffff:10.0.0.1"]) + "\n")
put("profile", "ok.example\nbad..name\n\n1.2.3.4/40\n*.198.51.100.7\n[198.51.100.7]:80\n2001:db8::1:443/tcp\n")

# config: every key, partial sections, and refused shapes from config.rs's tests.
put("config", "mode: hook\ndefault_profiles: [base, dev-python, base]\nloopback_ports:\n  - 8080\n  - 5432\n"
    "audit:\n  enabled: false\n  max_bytes: 1048576\nupstream_dns: 2001:db8::53\n"
    "dns:\n  tier: dnsmasq\n  min_ttl: 5\n  max_ttl: 600\n  cache_max_age: 120\n")
put("config", "dns:\n  tier: static\naudit: {}\n")
put("config", "default_profiles: []\nupstream_dns: 192.0.2.53\n")
put("config", "mod: hook\n")
put("config", "- a\n- b\n")
put("config", "dns: {min_ttl: 600, max_ttl: 60}\nloopback_ports: [22, 0]\n")
put("config", "a: &x [1, 2]\nb: *x\n")
rand_bytes("config", 3)

# bundle: the format-1 fixtures, a format-2 rewrite of one, and a newer format.
v1 = json.load(open(os.path.join(REPO, "src/core/testdata/state-format1.json")))
put("bundle", open(os.path.join(REPO, "src/core/testdata/state-format1.json"), "rb").read())
put("bundle", open(os.path.join(REPO, "src/core/testdata/state-format1-early.json"), "rb").read())
v2 = dict(v1)
v2["format"] = 2
v2["written_by"] = v2.pop("shield_version")
v2["audit_max_bytes"] = 8388608
v2["published"] = ["8080/tcp"]
put("bundle", json.dumps(v2))
v3 = dict(v2, format=3, a_field_from_the_future=True)
put("bundle", json.dumps(v3))
rand_bytes("bundle", 3)

# oci: the states of oci.rs's tests.
def state(pid, ann, id_="abc"):
    return '{"ociVersion":"1.0.2","id":"%s","status":"creating","pid":%s,"bundle":"/b","annotations":{%s}}' % (id_, pid, ann)
put("oci", state("4242", '"terok.shield.name":"c1","terok.shield.state_dir":"/home/u/.local/state/terok/shield/containers/c1","terok.shield.version":"0.1.0","io.podman.annotations.autoremove":"TRUE"'))
put("oci", state("42", '"terok.shield.name":"pod-a","terok.shield.profiles":"base dev-node","terok.shield.mode":"down","terok.shield.dns_tier":"static"'))
put("oci", state("7", '"terok.shield.name":"c","terok.shield.state_dir":"/s/../../etc"'))
put("oci", state("null", '"terok.shield.name":"c","terok.shield.profiles":"../p"', "../../x"))
put("oci", "base, dev-node\ndown_all\nbuiltin")
rand_bytes("oci", 3)

# dns_query: queries as clients send them.
def name(n):
    return b"".join(bytes([len(l)]) + l.encode() for l in n.split(".")) + b"\0"
def query(id_, n, qtype=1, qclass=1, flags=0x0100, qd=1, edns=False):
    q = struct.pack(">HHHHHH", id_, flags, qd, 0, 0, 1 if edns else 0)
    for _ in range(qd):
        q += name(n) + struct.pack(">HH", qtype, qclass)
    if edns:
        q += b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0)
    return q
put("dns_query", query(0x1234, "example.com"))
put("dns_query", query(0x1234, "ExAmPlE.CoM", 28, edns=True))
put("dns_query", query(7, "version.bind", 16, 3))
put("dns_query", query(8, "a.example.org", qd=2))
put("dns_query", query(9, "example.com", 255))
put("dns_query", query(10, "example.com", flags=0x2800))  # UPDATE
put("dns_query", query(11, "example.com", flags=0x8180))  # a response
put("dns_query", query(12, "a b.example.com"))

# dns_answer, verify, nfnetlink: structured inputs from any bytes.
rand_bytes("dns_answer", 8, 512)
rand_bytes("verify", 8, 512)
put("verify", json.dumps({"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "terok_shield", "handle": 1}},
    {"set": {"family": "inet", "table": "terok_shield", "name": "allow_v4", "type": "ipv4_addr", "elem": ["198.51.100.7", {"prefix": {"addr": "10.0.0.0", "len": 8}}]}},
    {"chain": {"family": "inet", "table": "terok_shield", "name": "output", "type": "filter", "hook": "output", "prio": 0, "policy": "drop"}}]}))
rand_bytes("nfnetlink", 8, 512)

# nflog: messages as events.rs's tests build them.
def attr(kind, value):
    a = struct.pack("=HH", 4 + len(value), kind) + value
    return a + b"\0" * (-len(a) % 4)
def nflog(prefix, payload, seq=None):
    body = bytes([2, 0, 0, 100]) + attr(1, bytes([8, 0, 3, 0])) + attr(10, prefix + b"\0")
    if seq is not None:
        body += attr(12, struct.pack(">I", seq))
    body += attr(9, payload)
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body
v4 = bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 51, 100, 2, 198, 51, 100, 20]) + struct.pack(">HH", 40000, 443) + bytes(16)
v6 = bytes([0x60, 0, 0, 0, 0, 20, 44, 64]) + bytes(16) + bytes.fromhex("20010db8000000000000000000000001") \
    + bytes([17, 0, 0, 0, 0, 0, 0, 7]) + struct.pack(">HH", 40000, 53) + bytes(16)
put("nflog", nflog(b"TEROK_SHIELD_DENIED: ", v4, 7))
put("nflog", nflog(b"TEROK_SHIELD_PRIVATE: ", v6) + nflog(b"TEROK_SHIELD_BYPASS: ", v4[:22], 9))
rand_bytes("nflog", 4)
