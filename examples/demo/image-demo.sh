#!/bin/bash
# make demo, part two: build a small Debian image (Essential packages + python3) with
# stockade image build from the local package mirror (.cache/debs, fetched by make), push it
# to a throwaway registry on 127.0.0.1 (our own config; stopped and removed at the end), and
# run the demo job in it: the same controls, the image's own /usr.
set -euo pipefail
cd "$(dirname "$0")/../.."
stockade=.venv/bin/stockade
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
work=$(mktemp -d /tmp/stockade-demo-registry.XXXXXX)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/config.yml" <<CONFIG
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/data}}
http: {addr: "127.0.0.1:$port", secret: stockade-demo}
CONFIG
/usr/bin/docker-registry serve "$work/config.yml" > "$work/registry.log" 2>&1 &
registry=$!
trap 'kill $registry 2>/dev/null; wait $registry 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  curl -fso /dev/null "http://127.0.0.1:$port/v2/" && break
  sleep 0.1
done

echo "== stockade image build demo/python --suite $suite --include python3"
$stockade image build demo/python --suite "$suite" --include python3 \
  --mirror "deb [trusted=yes] copy://$PWD/.cache/debs ./" > "$work/build.out"
cat "$work/build.out"
built=$(tail -1 "$work/build.out")
export STOCKADE_IMAGE_REGISTRIES="127.0.0.1:$port" STOCKADE_INSECURE_REGISTRIES="127.0.0.1:$port"
echo; echo "== stockade image push $built 127.0.0.1:$port/demo/python:1"
image=$($stockade image push "$built" "127.0.0.1:$port/demo/python:1" | tail -1)
echo "$image"
sed "s|^name: .*|&-in-image\nimage: $image|" examples/demo/job.yaml > "$work/job.yaml"
echo; echo "== stockade run (the demo job, image: $image)"
$stockade run "$work/job.yaml" --workspace examples/demo
