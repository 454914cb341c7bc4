#!/bin/sh
# Writes DIR/tether.toml: a tether configuration for the MCP example, with
# one registration entry per example process (selected by this user's uid
# and the process's executable, so each gets its own identity) and the
# example's policies. Run it after `cargo build --examples`, with the three
# example binaries on PATH (see the README, "MCP in five minutes").
set -eu
dir=${1:?usage: setup.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
path_of() {
  command -v "$1" >/dev/null 2>&1 || { echo "setup.sh: $1 is not on PATH (cargo build --examples, then add target/<profile>/examples to PATH)" >&2; exit 1; }
  # The executable as the kernel names it: symlinks resolved.
  readlink -f "$(command -v "$1")"
}
agent=$(path_of mcp-agent)
server=$(path_of mcp-notes-server)
api=$(path_of notes-publish-api)
uid=$(id -u)
# A directory of this user's only: the token files go there too.
mkdir -p -m 700 "$dir"
if [ ! -O "$dir" ] || [ -n "$(find "$dir" -maxdepth 0 -perm /077)" ]; then
  echo "setup.sh: $dir must be a directory of yours that others cannot enter (chmod 700)" >&2
  exit 1
fi
cat > "$dir/tether.toml" <<TOML
# The MCP example's agent, written by examples/mcp/setup.sh.
trust_domain = "tether.local"
socket_path = "$dir/agent.sock"
admin_socket_path = "$dir/admin/admin.sock"
data_dir = "$dir/data"
policy_dir = "$here/policies"

# The agent: begins tasks for the notes server. Each agent process gets an
# X.509-SVID of its own (process_bound), so a task bound to one (mcp-agent
# --tls) cannot be used by another, even one running the same binary.
[[entries]]
spiffe_id = "spiffe://tether.local/mcp/agent"
selectors = ["unix:uid:$uid", "unix:path:$agent"]
process_bound = true

# The MCP server: tokens addressed to it are its to validate and exchange.
[[entries]]
spiffe_id = "spiffe://tether.local/mcp/notes"
selectors = ["unix:uid:$uid", "unix:path:$server"]

# The publishing API: accepts tokens exchanged to it by the notes server.
[[entries]]
spiffe_id = "spiffe://tether.local/api/publish"
selectors = ["unix:uid:$uid", "unix:path:$api"]
TOML
echo "wrote $dir/tether.toml"
