# Sourced by the recipes: loads cluster.env (environment variables win) and resolves paths.
# shellcheck shell=bash
RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$RECIPES_DIR")"
FLEX_CLUSTER_CONFIG="${FLEX_CLUSTER_CONFIG:-$RECIPES_DIR/cluster.env}"

while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    key="${line%%=*}"
    value="${line#*=}"
    value="${value%"${value##*[![:space:]]}"}"
    if [[ ${#value} -ge 2 && ( "$value" == \"*\" || "$value" == \'*\' ) ]]; then
        value="${value:1:${#value}-2}"
    fi
    [[ -z "${!key+set}" ]] && export "$key=$value"
done <"$FLEX_CLUSTER_CONFIG"

case "$FLEX_JOB_DIR" in /*) ;; *) FLEX_JOB_DIR="$REPO_ROOT/$FLEX_JOB_DIR" ;; esac
case "$FLEX_PYTHON" in
    /*) ;;
    */*) FLEX_PYTHON="$REPO_ROOT/$FLEX_PYTHON" ;;
    *) FLEX_PYTHON="$(command -v "$FLEX_PYTHON")" ;;
esac
export FLEX_JOB_DIR FLEX_PYTHON
# Ranks import the flex_surgery of this checkout even where it is not installed.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
