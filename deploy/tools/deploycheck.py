#!/usr/bin/env python3
"""Offline checks for the rds-csi deployment (deploy/): render, sync, validate, dump.

There is no `helm` binary in CI, so this script renders the chart itself. It does not
implement Helm; it implements a small, documented subset of Go templates whose output is
identical to Helm's for the same input, and it *refuses* (exits non-zero, naming the file and
the action) any template that steps outside that subset. So the committed manifests are what
`helm template rds-csi deploy/helm/rds-csi --namespace kube-system` produces, document for
document (Helm additionally prefixes each document with `---` and a `# Source:` comment and
prints them sorted by kind).

The supported subset (everything else is an error):

* Text outside `{{ ... }}` is copied verbatim.
* Trim markers: `{{- ` removes all whitespace (space, tab, CR, LF) immediately before the
  action; ` -}}` removes all whitespace immediately after it (Go's text/template rule; the
  marker must be separated from the action by a space).
* Comments: `{{/* ... */}}`, also with trim markers.
* Control: `if PIPELINE`, `else`, `end`, and `range PIPELINE` over a list (`.` is each
  element in turn; `else` runs for an empty list). Truth as in Go: false, 0, "", nil, empty
  map/list are false.
* Pipelines: `ARG`, `FUNC ARG...`, and `... | FUNC ARG...` (the piped value is the last
  argument), where ARG is a field, a double-quoted string literal without escapes or a
  non-negative integer literal, and a field is relative to `.` (`.a.b`; at the top `.` is
  the root: `.Values.a.b`, `.Release.Name`, `.Release.Namespace`, `.Chart.Name`,
  `.Chart.Version`, `.Chart.AppVersion`) or to the root (`$.Values.a.b`). A missing key is
  an error (Helm would print an empty string).
* Functions: `quote` (Go's %q; only printable ASCII plus \\t \\n \\r is accepted),
  `b64enc` (standard base64 with padding, strings only), `not`, `indent N`, `nindent N`
  (Sprig's: every line padded, nindent starts with a newline), `toYaml` of maps and lists
  whose keys and strings print plain in YAML (no quoting needed), integers and booleans —
  anything that Go's and PyYAML's emitters could print differently (quoted strings,
  fractions, null) is refused — and `.Files.Get "path"` (a file of the chart, by literal
  path).
* Printing: strings verbatim, booleans as true/false, integers of magnitude < 1e6 in
  decimal (Helm holds numbers as float64 and Go prints 1e6 and above in exponent form, so
  larger numbers are refused); anything else (maps, lists, nil, fractions) is an error.

Values: `values.yaml` of the chart, deep-merged with each `--values FILE` (maps merge,
anything else replaces, null deletes), as `helm -f` does, then validated against
`values.schema.json` as Helm does. Release name and namespace default to
`rds-csi` and `kube-system`.

Sub-commands:
  render   [--values F]... [--release-name N] [--namespace NS] --out DIR
  sync     re-render the defaults into deploy/manifests (use after changing the chart)
  check-sync [--manifests DIR]   exit 1 with a diff when the committed manifests differ
  validate DIR...   validate every document against the Kubernetes schema
                    (kubernetes-validate, strict) or, for CRD kinds it does not ship, the
                    schemas in deploy/schemas/
  json     DIR...   print every document as JSON: [{"file": ..., "doc": {...}}, ...]
  unused-values     list the values.yaml leaves no template reads
"""

import argparse
import base64
import copy
import difflib
import json
import os
import re
import sys

try:
    import yaml
except ImportError:
    sys.exit(
        "deploycheck.py needs PyYAML and kubernetes-validate: "
        "pip install kubernetes-validate==1.37.0 (it brings PyYAML and jsonschema)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.dirname(HERE)
CHART = os.path.join(DEPLOY, "helm", "rds-csi")
MANIFESTS = os.path.join(DEPLOY, "manifests")
SCHEMAS = os.path.join(DEPLOY, "schemas")
# The Kubernetes version whose schema we validate against: the k8s-openapi feature the
# plugin is built with (v1_34).
KUBERNETES_VERSION = "1.34.0"
DEFAULT_RELEASE = "rds-csi"
DEFAULT_NAMESPACE = "kube-system"

WS = " \t\r\n"


class TemplateError(Exception):
    pass


# ---------------------------------------------------------------- lexing


def lex(src, name):
    """Split template text into ('text'|'action'|'comment', s) tokens, applying trims.

    Follows Go's lexer: a left trim marker is `{{-` followed by a space character; a right
    trim marker is a space character followed by `-}}`; a comment starts right after the
    delimiter (and trim marker) with `/*` and its `*/` must be followed by the closing
    delimiter (optionally with a trim marker).
    """
    tokens = []
    pos = 0
    while True:
        start = src.find("{{", pos)
        if start < 0:
            tokens.append(("text", src[pos:]))
            return tokens
        text = src[pos:start]
        inner = start + 2
        if src[inner : inner + 1] == "-" and src[inner + 1 : inner + 2] in tuple(WS):
            text = text.rstrip(WS)
            inner += 2
        tokens.append(("text", text))
        if src.startswith("/*", inner):
            close = src.find("*/", inner)
            if close < 0:
                raise TemplateError(f"{name}: unterminated comment at offset {start}")
            after = close + 2
            if src.startswith("}}", after):
                end, trim_right = after, False
            elif src[after : after + 1] in tuple(WS) and src.startswith("-}}", after + 1):
                end, trim_right = after + 1, True
            else:
                raise TemplateError(f"{name}: comment ends before closing delimiter at {start}")
            tokens.append(("comment", src[inner:close]))
            pos = end + (3 if trim_right else 2)
        else:
            end = src.find("}}", inner)
            if end < 0:
                raise TemplateError(f"{name}: unterminated action at offset {start}")
            body = src[inner:end]
            trim_right = len(body) >= 2 and body[-1] == "-" and body[-2] in WS
            if trim_right:
                body = body[:-1]
            tokens.append(("action", body.strip(WS)))
            pos = end + 2
        if trim_right:
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(WS))


# ---------------------------------------------------------------- parsing

FIELD_RE = re.compile(r"^(\$)?((?:\.[A-Za-z_][A-Za-z0-9_]*)+)$")
STRING_RE = re.compile(r'^"([^"\\]*)"$')
INT_RE = re.compile(r"^[0-9]+$")
FUNCS = {"quote", "b64enc", "not", "indent", "nindent", "toYaml", ".Files.Get"}


def parse(tokens, name):
    """Build a tree: list of nodes ('text', s) | ('print', pipeline) | ('if', pipe, a, b)."""
    stack = [[]]
    ifs = []
    for kind, body in tokens:
        if kind == "text":
            stack[-1].append(("text", body))
        elif kind == "comment":
            continue
        else:
            words = body.split(None, 1)
            if not words:
                raise TemplateError(f"{name}: empty action")
            head = words[0]
            if head in ("if", "range"):
                node = [head, parse_pipeline(words[1] if len(words) > 1 else "", name), [], None]
                stack[-1].append(node)
                ifs.append(node)
                stack.append(node[2])
            elif head == "else":
                if len(words) > 1:
                    raise TemplateError(f"{name}: unsupported action {body!r} (only plain else)")
                if not ifs or ifs[-1][3] is not None:
                    raise TemplateError(f"{name}: else without if")
                stack.pop()
                ifs[-1][3] = []
                stack.append(ifs[-1][3])
            elif head == "end":
                if len(words) > 1 or not ifs:
                    raise TemplateError(f"{name}: unexpected {body!r}")
                stack.pop()
                ifs.pop()
            elif head in ("with", "define", "template", "block", "include") or (
                head not in FUNCS and not head.startswith(".") and not head.startswith("$") and not head.startswith('"')
            ):
                raise TemplateError(f"{name}: unsupported action {body!r}")
            else:
                stack[-1].append(("print", parse_pipeline(body, name)))
    if ifs:
        raise TemplateError(f"{name}: unclosed if")
    return stack[0]


def parse_pipeline(src, name):
    commands = []
    for part in src.split("|"):
        words = part.split()
        if not words:
            raise TemplateError(f"{name}: empty command in pipeline {src!r}")
        if words[0] in FUNCS:
            commands.append((words[0], [parse_arg(w, name) for w in words[1:]]))
            if words[0] == ".Files.Get" and (len(words) != 2 or not STRING_RE.match(words[1])):
                raise TemplateError(f"{name}: .Files.Get takes one string literal")
        else:
            if len(words) != 1:
                raise TemplateError(f"{name}: unsupported command {part.strip()!r}")
            commands.append((None, [parse_arg(words[0], name)]))
    if commands[0][0] is None and len(commands[0][1]) != 1:
        raise TemplateError(f"{name}: bad pipeline {src!r}")
    for fn, _ in commands[1:]:
        if fn is None:
            raise TemplateError(f"{name}: only functions may follow | in {src!r}")
    return commands


def parse_arg(word, name):
    if STRING_RE.match(word):
        return ("lit", STRING_RE.match(word).group(1))
    if INT_RE.match(word):
        return ("lit", int(word))
    if word == ".":
        return ("field", False, [])
    m = FIELD_RE.match(word)
    if m:
        return ("field", bool(m.group(1)), [p for p in m.group(2).split(".") if p])
    raise TemplateError(f"{name}: unsupported argument {word!r}")


# ---------------------------------------------------------------- evaluation


def truth(v):
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, (str, list, dict)):
        return len(v) > 0
    raise TemplateError(f"cannot take the truth of {v!r}")


def go_quote(s, name):
    if not isinstance(s, str):
        raise TemplateError(f"{name}: quote of a non-string {s!r} is outside the subset")
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            raise TemplateError(f"{name}: quote of {ch!r} is outside the subset")
    out.append('"')
    return "".join(out)


def yaml_checked(v, name):
    """Refuses what Go's YAML emitter and PyYAML could print differently."""
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise TemplateError(f"{name}: toYaml of a non-string key {k!r}")
            yaml_checked(k, name)
            yaml_checked(x, name)
    elif isinstance(v, list):
        for x in v:
            yaml_checked(x, name)
    elif isinstance(v, bool) or isinstance(v, int):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1_000_000:
            raise TemplateError(f"{name}: toYaml of {v}: Go prints it in exponent form")
    elif isinstance(v, str):
        if yaml.safe_dump(v, width=float("inf")) != v + "\n...\n" or v.strip() != v or not v:
            raise TemplateError(f"{name}: toYaml of {v!r} needs quoting: outside the subset")
    else:
        raise TemplateError(f"{name}: toYaml of {v!r} is outside the subset")


def call(fn, args, name, chart=None):
    if fn == "toYaml":
        if len(args) != 1 or not isinstance(args[0], (dict, list)):
            raise TemplateError(f"{name}: toYaml takes one map or list, got {args!r}")
        yaml_checked(args[0], name)
        text = yaml.safe_dump(args[0], default_flow_style=False, sort_keys=True, width=float("inf"))
        # Helm's toYaml trims the final newline.
        return text[:-1] if text.endswith("\n") else text
    if fn in ("indent", "nindent"):
        if len(args) != 2 or not isinstance(args[0], int) or not isinstance(args[1], str):
            raise TemplateError(f"{name}: {fn} takes a width and a string, got {args!r}")
        pad = " " * args[0]
        text = pad + args[1].replace("\n", "\n" + pad)
        return "\n" + text if fn == "nindent" else text
    if fn == ".Files.Get":
        if len(args) != 1 or not isinstance(args[0], str) or ".." in args[0]:
            raise TemplateError(f"{name}: .Files.Get takes one literal path in the chart")
        path = os.path.join(chart or CHART, args[0])
        if not os.path.isfile(path):
            raise TemplateError(f"{name}: .Files.Get {args[0]!r}: no such file in the chart")
        with open(path, encoding="utf-8") as f:
            return f.read()
    if fn == "quote":
        return " ".join(go_quote(a, name) for a in args if a is not None)
    if fn == "b64enc":
        if len(args) != 1 or not isinstance(args[0], str):
            raise TemplateError(f"{name}: b64enc takes one string, got {args!r}")
        return base64.b64encode(args[0].encode()).decode()
    if fn == "not":
        if len(args) != 1:
            raise TemplateError(f"{name}: not takes one argument")
        return not truth(args[0])
    raise TemplateError(f"{name}: unknown function {fn}")


def lookup(ctx, dot, arg, name):
    _, from_root, path = arg
    if from_root or dot is ctx:
        ctx.setdefault("_used", set()).add(tuple(path))
        v = ctx
    else:
        v = dot
    for i, key in enumerate(path):
        if not isinstance(v, dict) or key not in v:
            raise TemplateError(f"{name}: .{'.'.join(path[: i + 1])} is not set")
        v = v[key]
    return v


def eval_pipeline(pipe, ctx, dot, name):
    value = None
    for i, (fn, args) in enumerate(pipe):
        vals = [a[1] if a[0] == "lit" else lookup(ctx, dot, a, name) for a in args]
        if i > 0:
            vals.append(value)
        value = vals[0] if fn is None else call(fn, vals, name, ctx.get("_chart"))
    return value


def to_text(v, name):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        if abs(v) >= 1_000_000:
            raise TemplateError(f"{name}: Helm prints {v} in exponent form; refused")
        return str(int(v))
    raise TemplateError(f"{name}: printing {v!r} is outside the subset")


def execute(nodes, ctx, dot, name, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(to_text(eval_pipeline(node[1], ctx, dot, name), name))
        elif node[0] == "range":
            items = eval_pipeline(node[1], ctx, dot, name)
            if items is None:
                items = []
            if not isinstance(items, list):
                raise TemplateError(f"{name}: range over {items!r}: only lists are in the subset")
            for item in items:
                execute(node[2], ctx, item, name, out)
            if not items:
                execute(node[3] or [], ctx, dot, name, out)
        else:
            branch = node[2] if truth(eval_pipeline(node[1], ctx, dot, name)) else node[3]
            execute(branch or [], ctx, dot, name, out)


def render_text(src, ctx, name):
    out = []
    execute(parse(lex(src, name), name), ctx, ctx, name, out)
    return "".join(out)


# ---------------------------------------------------------------- chart


def deep_merge(base, over):
    result = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def load_yaml_file(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def render_chart(
    chart=CHART, value_files=(), release=DEFAULT_RELEASE, namespace=DEFAULT_NAMESPACE, used=None
):
    """Returns {template file name: rendered text} for every template.

    When `used` is a set, the paths of all values the templates looked up are added to it.
    """
    meta = load_yaml_file(os.path.join(chart, "Chart.yaml"))
    values = load_yaml_file(os.path.join(chart, "values.yaml")) or {}
    for vf in value_files:
        values = deep_merge(values, load_yaml_file(vf) or {})
    schema_path = os.path.join(chart, "values.schema.json")
    if os.path.exists(schema_path):
        # Helm validates the merged values against values.schema.json before rendering.
        import jsonschema

        with open(schema_path, encoding="utf-8") as f:
            schema = json.load(f)
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(values), key=lambda e: list(e.path)
        )
        if errors:
            raise TemplateError(
                "values do not match values.schema.json: "
                + "; ".join(f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors)
            )
    ctx = {
        "_chart": chart,
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace},
        "Chart": {
            "Name": meta["name"],
            "Version": meta["version"],
            "AppVersion": meta.get("appVersion", ""),
        },
    }
    tdir = os.path.join(chart, "templates")
    out = {}
    for fname in sorted(os.listdir(tdir)):
        if fname.startswith("_") or fname == "NOTES.txt":
            raise TemplateError(f"{fname}: partials and NOTES.txt are outside the subset")
        if not fname.endswith(".yaml"):
            raise TemplateError(f"{fname}: unexpected file in templates/")
        with open(os.path.join(tdir, fname), encoding="utf-8") as f:
            out[fname] = render_text(f.read(), ctx, f"templates/{fname}")
    if used is not None:
        used.update(ctx.get("_used", set()))
    return out


def leaves(values, prefix=()):
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


def switched_on(values):
    """`values` with every `enabled`/`create` switch set to true (every optional part on)."""
    if isinstance(values, dict):
        return {
            k: (True if k in ("enabled", "create") and isinstance(v, bool) else switched_on(v))
            for k, v in values.items()
        }
    return values


def unused_values():
    """Leaf paths of values.yaml that no template reads, with the default values or with
    every optional part switched on. A map read whole (toYaml) uses everything under it."""
    used = set()
    render_chart(used=used)
    values = load_yaml_file(os.path.join(CHART, "values.yaml")) or {}
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(switched_on(values), f)
    try:
        render_chart(value_files=[f.name], used=used)
    finally:
        os.unlink(f.name)

    def reads(u, leaf):
        path = ("Values",) + leaf
        n = min(len(u), len(path))
        return u[:n] == path[:n]

    return sorted(".".join(leaf) for leaf in leaves(values) if not any(reads(u, leaf) for u in used))


def write_rendered(rendered, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for fname in os.listdir(out_dir):
        if fname.endswith(".yaml") and fname not in rendered:
            os.remove(os.path.join(out_dir, fname))
    for fname, text in rendered.items():
        with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as f:
            f.write(text)


def check_sync(manifests_dir):
    rendered = render_chart()
    problems = []
    present = sorted(f for f in os.listdir(manifests_dir) if f.endswith(".yaml"))
    for extra in sorted(set(present) - set(rendered)):
        problems.append(f"{manifests_dir}/{extra}: no template renders it")
    for fname, text in rendered.items():
        path = os.path.join(manifests_dir, fname)
        if not os.path.exists(path):
            problems.append(f"{path}: missing (rendered from templates/{fname})")
            continue
        with open(path, encoding="utf-8") as f:
            committed = f.read()
        if committed != text:
            diff = "".join(
                difflib.unified_diff(
                    committed.splitlines(True),
                    text.splitlines(True),
                    f"committed {path}",
                    f"rendered templates/{fname}",
                )
            )
            problems.append(diff)
    return problems


# ---------------------------------------------------------------- documents


def documents(dirs):
    """Every non-empty YAML document under the given files/directories, in file order."""
    files = []
    for d in dirs:
        if os.path.isdir(d):
            files += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".yaml")]
        else:
            files.append(d)
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path, doc))
    return docs


def own_schema(doc):
    """Schema shipped in deploy/schemas/ for a kind kubernetes-validate does not know."""
    group_version = doc.get("apiVersion", "")
    kind = doc.get("kind", "")
    fname = f"{kind.lower()}-{group_version.replace('/', '-')}.json"
    path = os.path.join(SCHEMAS, fname)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def validate(dirs):
    try:
        import jsonschema
        import kubernetes_validate
    except ImportError as e:
        return [f"missing Python package ({e}): pip install kubernetes-validate==1.37.0"]
    errors = []
    count = 0
    for path, doc in documents(dirs):
        count += 1
        what = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        schema = own_schema(doc)
        if schema is not None:
            validator = jsonschema.Draft7Validator(schema)
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                loc = ".".join(str(p) for p in err.path) or "(root)"
                errors.append(f"{what}: {loc}: {err.message}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{what}: no schema (neither kubernetes-validate nor deploy/schemas): {e}")
        except kubernetes_validate.ValidationError as e:
            loc = ".".join(str(p) for p in e.path) or "(root)"
            errors.append(f"{what}: {loc}: {e.message}")
        except kubernetes_validate.InvalidSchemaError as e:
            errors.append(f"{what}: invalid schema: {e}")
    if count == 0:
        errors.append(f"no documents found in {dirs}")
    return errors


# ---------------------------------------------------------------- CLI


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("--values", action="append", default=[])
    r.add_argument("--release-name", default=DEFAULT_RELEASE)
    r.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    r.add_argument("--chart", default=CHART)
    r.add_argument("--out", required=True)
    sub.add_parser("sync")
    c = sub.add_parser("check-sync")
    c.add_argument("--manifests", default=MANIFESTS)
    v = sub.add_parser("validate")
    v.add_argument("paths", nargs="+")
    sub.add_parser("unused-values")
    j = sub.add_parser("json")
    j.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    try:
        if args.cmd == "render":
            write_rendered(
                render_chart(args.chart, args.values, args.release_name, args.namespace), args.out
            )
        elif args.cmd == "sync":
            write_rendered(render_chart(), MANIFESTS)
        elif args.cmd == "check-sync":
            problems = check_sync(args.manifests)
            if problems:
                print("\n".join(problems))
                print(
                    "deploy/manifests differs from the chart: run "
                    "`python3 deploy/tools/deploycheck.py sync` and commit the result",
                    file=sys.stderr,
                )
                return 1
            print("manifests in sync with the chart")
        elif args.cmd == "validate":
            errors = validate(args.paths)
            if errors:
                print("\n".join(errors))
                return 1
            print(f"all documents valid (Kubernetes {KUBERNETES_VERSION}, strict)")
        elif args.cmd == "unused-values":
            for path in unused_values():
                print(path)
        elif args.cmd == "json":
            docs = [{"file": path, "doc": doc} for path, doc in documents(args.paths)]
            json.dump(docs, sys.stdout)
    except TemplateError as e:
        print(f"template error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
