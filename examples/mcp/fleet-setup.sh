#!/bin/sh
# The MCP example across three simulated nodes (README, "MCP across nodes").
#
#   fleet-setup.sh DIR      creates the nodes and writes the configurations
#   fleet-setup.sh --down   deletes the nodes again
#
# Each node is a network namespace (node A: tether-a, B: tether-b, C:
# tether-c) with a veth pair to one bridge in the root namespace
# (tether-br0). The bridge has SUBNET.1, where the tether server listens;
# the nodes have SUBNET.11, .12 and .13, and reach each other and the
# server over the bridge (no IP forwarding).
#
# Writes DIR/server.toml (the server: trust domain tether.local, its data
# and admin socket under DIR) and DIR/a/tether.toml, DIR/b/tether.toml,
# DIR/c/tether.toml (an agent per node in fleet mode, bootstrapped with
# DIR/bundle.json, which the walkthrough writes once the server runs, and
# with the example's policies).
#
# Environment (so that tests can run several fleets at once):
#   TETHER_MCP_NETNS_PREFIX  names' prefix, default "tether-" (at most 11
#                            characters: a-z, 0-9, -)
#   TETHER_MCP_SUBNET        the /24's first three octets, default 10.77.0
#
# Needs root (network namespaces) and iproute2.
set -eu

prefix=${TETHER_MCP_NETNS_PREFIX:-tether-}
subnet=${TETHER_MCP_SUBNET:-10.77.0}
here=$(cd "$(dirname "$0")" && pwd)
arg=${1:-}

fail() {
  echo "fleet-setup.sh: $*" >&2
  exit 1
}

case $prefix in
  '' | *[!a-z0-9-]*) fail "TETHER_MCP_NETNS_PREFIX=$prefix: only a-z, 0-9 and - (and not empty)" ;;
esac
# Interface names are at most 15 characters: PREFIX + "br0".
[ "${#prefix}" -le 11 ] || fail "TETHER_MCP_NETNS_PREFIX=$prefix: at most 11 characters"

# Three octets, each at most 255.
old_ifs=$IFS
IFS=.
# shellcheck disable=SC2086 # split on dots, on purpose
set -- $subnet
IFS=$old_ifs
[ "$#" -eq 3 ] || fail "TETHER_MCP_SUBNET=$subnet: three octets, like 10.77.0"
for octet in "$@"; do
  case $octet in
    '' | *[!0-9]*) fail "TETHER_MCP_SUBNET=$subnet: three octets, like 10.77.0" ;;
  esac
  [ "$octet" -le 255 ] || fail "TETHER_MCP_SUBNET=$subnet: $octet is not an octet"
done

[ "$(id -u)" -eq 0 ] || fail "needs root: it creates network namespaces (run it with sudo)"
command -v ip >/dev/null 2>&1 || fail "ip (iproute2) is not installed"

bridge=${prefix}br0
nodes="a b c"

down() {
  for node in $nodes; do
    ns=$prefix$node
    if ip netns list | grep -q "^$ns\( \|$\)"; then
      pids=$(ip netns pids "$ns" | tr '\n' ' ')
      if [ -n "$pids" ]; then
        echo "fleet-setup.sh: processes still run in $ns ($pids); it goes once they exit" >&2
      fi
      ip netns delete "$ns"
      echo "deleted $ns"
    fi
  done
  # Deleting a namespace deletes its veth end, and so the pair.
  if ip link show "$bridge" >/dev/null 2>&1; then
    ip link delete "$bridge"
    echo "deleted $bridge"
  fi
}

if [ "$arg" = --down ]; then
  down
  exit 0
fi

[ -n "$arg" ] || fail "usage: fleet-setup.sh DIR (or fleet-setup.sh --down)"
dir=$arg
case $dir in
  /*) ;;
  *) fail "$dir: an absolute path, please (the configurations name it)" ;;
esac

for node in $nodes; do
  if ip netns list | grep -q "^$prefix$node\( \|$\)"; then
    fail "the namespace $prefix$node exists already: fleet-setup.sh --down first"
  fi
done
if ip link show "$bridge" >/dev/null 2>&1; then
  fail "the link $bridge exists already: fleet-setup.sh --down first"
fi

# Whatever fails from here leaves nothing half made.
trap 'status=$?; if [ "$status" -ne 0 ]; then down >/dev/null 2>&1 || true; fi' EXIT

ip link add "$bridge" type bridge
ip addr add "$subnet.1/24" dev "$bridge"
ip link set "$bridge" up
host=11
for node in $nodes; do
  ns=$prefix$node
  ip netns add "$ns"
  ip link add "$ns" type veth peer name eth0 netns "$ns"
  ip link set "$ns" master "$bridge" up
  ip -n "$ns" addr add "$subnet.$host/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  echo "node $node: namespace $ns, address $subnet.$host"
  host=$((host + 1))
done

# Root's only: the token files and join tokens go there too.
mkdir -p -m 700 "$dir"
if [ -n "$(find "$dir" -maxdepth 0 -perm /077)" ]; then
  fail "$dir must be a directory others cannot enter (chmod 700)"
fi

cat > "$dir/server.toml" <<TOML
# The MCP example's tether server, written by examples/mcp/fleet-setup.sh.
trust_domain = "tether.local"
data_dir = "$dir/server"
listen = "$subnet.1:8081"
admin_socket_path = "$dir/admin/server.sock"
TOML
echo "wrote $dir/server.toml"

for node in $nodes; do
  mkdir -p -m 700 "$dir/$node"
  cat > "$dir/$node/tether.toml" <<TOML
# The MCP example's agent on node $node, written by examples/mcp/fleet-setup.sh.
trust_domain = "tether.local"
socket_path = "$dir/$node/agent.sock"
admin_socket_path = "$dir/$node/admin/admin.sock"
data_dir = "$dir/$node/data"
policy_dir = "$here/policies"

# Fleet mode: the entries and the signing come from the server.
[server]
address = "$subnet.1:8081"
bootstrap_bundle = "$dir/bundle.json"
TOML
  echo "wrote $dir/$node/tether.toml"
done
