#!/usr/bin/env bash
# Refresh the chat page's third-party files from the npm registry (needs `npm`; parlour itself
# never needs Node.js). Edit the pinned versions below, run this, and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."

MARKED=18.2.1
DOMPURIFY=3.4.18
SWAGGER_UI=5.35.0

dest=parlour/web/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch() { # name version -> unpacked into $work/name
  (cd "$work" && npm pack --silent "$1@$2" >/dev/null)
  mkdir -p "$work/$1"
  tar xzf "$work/$1-$2.tgz" -C "$work/$1" --strip-components=1
}

fetch marked "$MARKED"
fetch dompurify "$DOMPURIFY"
fetch swagger-ui-dist "$SWAGGER_UI"

rm -rf "$dest"
mkdir -p "$dest/marked" "$dest/dompurify" "$dest/swagger-ui"
cp "$work/marked/lib/marked.umd.js" "$work/marked/LICENSE" "$dest/marked/"
cp "$work/dompurify/dist/purify.min.js" "$work/dompurify/LICENSE" "$dest/dompurify/"
cp "$work/swagger-ui-dist/swagger-ui-bundle.js" "$work/swagger-ui-dist/swagger-ui.css" \
  "$work/swagger-ui-dist/LICENSE" "$work/swagger-ui-dist/NOTICE" "$dest/swagger-ui/"
# Source maps are not shipped; drop the comment that asks the browser for them.
sed -i '/^\/\/# sourceMappingURL=/d' "$dest"/*/*.js
sed -i 's#/\*\# sourceMappingURL=[^*]*\*/##' "$dest/swagger-ui/swagger-ui.css"
cat > "$dest/VERSIONS" <<END
marked $MARKED (MIT) https://www.npmjs.com/package/marked
dompurify $DOMPURIFY (Apache-2.0 or MPL-2.0) https://www.npmjs.com/package/dompurify
swagger-ui-dist $SWAGGER_UI (Apache-2.0) https://www.npmjs.com/package/swagger-ui-dist
END
echo "vendored into $dest"
