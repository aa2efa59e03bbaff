# Sourced by the training launch scripts: cd to the repository, parse `[--dry-run] CONFIG WORKDIR [key=value ...]`
# into dry_run, config, workdir and the remaining overrides ("$@" after `shift 2` by the caller), and define `run`,
# which prints a command (shell-quoted) under --dry-run and runs it otherwise.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
run() { if (( dry_run )); then printf '%q' "$1"; printf ' %q' "${@:2}"; echo; else "$@"; fi; }
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 ]]; then echo "usage: $0 [--dry-run] CONFIG WORKDIR [key=value ...]" >&2; exit 2; fi
config=$1 workdir=$2
