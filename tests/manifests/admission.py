"""What the Kubernetes API server does with our CRDs and custom resources,
beyond the OpenAPI schema (which `jsonschema` checks):

- CEL admission: every `x-kubernetes-validations` rule is evaluated with a
  real CEL engine (cel-python) wherever its field is present, as the API
  server does on create, update and apply.
- The static CEL cost estimate the API server computes when a CRD is
  created or updated, with its limits: each rule's cost times the number of
  times its field can occur in one request must stay under 1e7
  (StaticEstimatedCostLimit), the sum over the CRD under 1e8
  (StaticEstimatedCRDCostLimit). Sizes follow the API server's model
  (k8s.io/apiextensions-apiserver .../schema/cel/model/schemas.go): a
  string's size is 4 bytes per `maxLength` character, or whatever fits in a
  3 MiB request; a list's length is `maxItems`, or the number of its
  smallest items that fit in a request. The cost of `matches` is cel-go's:
  ceil((len+1) * 0.1) * ceil(len(regex) * 0.25).

The expression model is deliberately small: a rule using a function it does
not model is an error here (extend the model), never a guess.
"""

import math
import re

import celpy

MAX_REQUEST_BYTES = 3 * 1024 * 1024
PER_EXPRESSION_LIMIT = 10_000_000
PER_CRD_LIMIT = 100_000_000
MIN_STRING_SIZE = 2          # ""
STRING_TRAVERSAL = 0.1       # cel-go common.StringTraversalCostFactor
REGEX_LENGTH = 0.25          # cel-go common.RegexStringLengthCostFactor


class NotModelled(Exception):
    pass


def min_serialized_size(schema):
    t = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return 1
    if t == "object":
        if "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
            return 2
        size = 2
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            if name in required and "default" not in prop:
                size += len(name) + min_serialized_size(prop) + 4
        return size
    if t == "string":
        return MIN_STRING_SIZE
    if t == "array":
        return 2
    if t == "boolean":
        return 4
    return 1


def max_items(schema):
    if "maxItems" in schema:
        return schema["maxItems"]
    return (MAX_REQUEST_BYTES - 2) // (min_serialized_size(schema["items"]) + 1)


def max_properties(schema):
    if "maxProperties" in schema:
        return schema["maxProperties"]
    return (MAX_REQUEST_BYTES - 2) // (min_serialized_size(schema["additionalProperties"]) + 6)


def max_string_bytes(schema):
    if "maxLength" in schema:
        return schema["maxLength"] * 4
    return MAX_REQUEST_BYTES - 2


def walk(schema, path="", cardinality=1):
    """Yield (path, schema, cardinality) for every node of a structural schema."""
    yield path, schema, cardinality
    for name, prop in schema.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}", cardinality)
    if schema.get("type") == "array" and "items" in schema:
        yield from walk(schema["items"], f"{path}[]", cardinality * max_items(schema))
    ap = schema.get("additionalProperties")
    if isinstance(ap, dict):
        yield from walk(ap, f"{path}{{}}", cardinality * max_properties(schema))


FUNCTION = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
MATCHES = re.compile(r"(self(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\.matches\(\s*'((?:[^'\\]|\\.)*)'\s*\)")


def field_schema(schema, selector):
    node = schema
    for part in selector.split(".")[1:]:
        node = node.get("properties", {}).get(part)
        if node is None:
            raise NotModelled(f"{selector}: no such field")
    return node


def rule_cost(rule, schema):
    """The static cost of one rule evaluated on a node of `schema`."""
    cost = 0
    for selector, regex in MATCHES.findall(rule):
        target = field_schema(schema, selector)
        strlen = max_string_bytes(target)
        cost += math.ceil((strlen + 1) * STRING_TRAVERSAL) * math.ceil(len(regex) * REGEX_LENGTH)
    rest = MATCHES.sub("true", rule)
    for fn in FUNCTION.findall(rest):
        if fn not in {"has"}:
            raise NotModelled(f"{rule!r}: the cost of {fn}() is not modelled")
    # Every other operation (field selection, comparison, logic, has) is O(1):
    # count tokens as an upper bound of the expression's nodes.
    cost += len(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*|\d+|&&|\|\||[!<>=]=?|\bin\b", rest))
    return cost


def crd_costs(crd):
    """[(path, rule, cost per evaluation, cardinality, total)] for every rule of every version."""
    out = []
    for version in crd["spec"]["versions"]:
        root = version["schema"]["openAPIV3Schema"]
        for path, node, cardinality in walk(root):
            for v in node.get("x-kubernetes-validations", []):
                cost = rule_cost(v["rule"], node)
                out.append((f"{version['name']}:{path or '.'}", v["rule"], cost, cardinality, cost * cardinality))
    return out


def cost_problems(crd):
    """What the API server would refuse the CRD for, as messages."""
    problems = []
    costs = crd_costs(crd)
    for path, rule, cost, cardinality, total in costs:
        if total > PER_EXPRESSION_LIMIT:
            problems.append(f"{path}: rule {rule!r} costs {cost} x {cardinality} occurrences = {total:.3g} "
                            f"> {PER_EXPRESSION_LIMIT:.0e} per expression")
    total = sum(c[4] for c in costs)
    if total > PER_CRD_LIMIT:
        problems.append(f"{crd['metadata']['name']}: rules cost {total:.3g} together > {PER_CRD_LIMIT:.0e} per CRD")
    return problems


_env = celpy.Environment()
_programs = {}


def _program(rule):
    if rule not in _programs:
        _programs[rule] = _env.program(_env.compile(rule))
    return _programs[rule]


def cel_violations(obj, schema, path=""):
    """Messages of every `x-kubernetes-validations` rule `obj` breaks."""
    out = []
    for v in schema.get("x-kubernetes-validations", []):
        try:
            ok = _program(v["rule"]).evaluate({"self": celpy.json_to_cel(obj)})
        except celpy.CELEvalError as e:
            ok = False
            v = dict(v, message=f"{v.get('message', v['rule'])} (evaluation error: {e})")
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            out.append(f"{path or '.'}: {v.get('message', 'failed rule: ' + v['rule'])}")
    if isinstance(obj, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in obj and obj[name] is not None:
                out += cel_violations(obj[name], prop, f"{path}.{name}")
        ap = schema.get("additionalProperties")
        if isinstance(ap, dict):
            for k, val in obj.items():
                out += cel_violations(val, ap, f"{path}.{k}")
    if isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += cel_violations(item, schema["items"], f"{path}[{i}]")
    return out


def admit(obj, crds):
    """The API server's verdict on a custom resource: [] or the reasons it refuses it."""
    import jsonschema
    from test_manifests import schema_of
    crd = crds[obj["kind"]]
    schema = schema_of(crd)
    errors = [f"{'.'.join(map(str, e.path)) or '.'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    version = next(v for v in crd["spec"]["versions"] if obj["apiVersion"].endswith("/" + v["name"]))
    return errors + cel_violations(obj, version["schema"]["openAPIV3Schema"])
