"""The user's dotted names of modules and parameters, from dynamo's source strings.

Dynamo names what a graph reads by the Python expression that reaches it from the compiled frame: a parameter
``L['self']._modules['fc']._parameters['weight']``, a module in ``node.meta["nn_module_stack"]``
``L['self'].encoder.layer.0``. Wrappers whose ``__getattr__`` dynamo reads through the instance dictionary
(peft's) add ``__dict__['_modules']`` steps, a model passed in a list adds an index to the root
(``L['models'][0].fc``). :func:`user_path` turns all of them into the name ``named_modules()`` and
``named_parameters()`` of the root module give: ``fc.weight``, ``encoder.layer.0``,
``base_model.model.bert.encoder.layer.0.attention.self.query``. The report, the errors and the parameter names of
the backend all use it, so each shows one name for one module. It parses strings rather than walking
``torch._dynamo.source`` objects: ``nn_module_stack`` keeps only a source's name (torch 2.13), so one parser
serves the modules and the parameters.
"""

from __future__ import annotations

import ast
import re

# torch.nn.Module's storage: a step through it is no part of the user's name
_STORAGE = frozenset({"__dict__", "_modules", "_parameters", "_buffers"})
# the forms of dynamo's sources that call a function on the base: an attribute (``getattr(base, 'a-b')``, a name
# that is no identifier) or an item (``list.__getitem__(base, 0)``)
_KEY = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|-?\d+"
_ATTR_CALL = re.compile(rf"(?:getattr|object\.__getattribute__)\(([^()]*), ({_KEY})\)")
_ITEM_CALL = re.compile(rf"(?:list|dict)\.__getitem__\(([^()]*), ({_KEY})\)")
# the frame's local or global the path starts from, with the items taken from it (``L['args'][0]``)
_ROOT = re.compile(rf"(?:L|G|SYNTHETIC_LOCAL)\[(?:{_KEY})\](?:\[(?:{_KEY})\])*")
# one step: ``.name`` (a module name may hold any character but a dot: ``heads.b-c``) or ``[key]``
_STEP = re.compile(rf"\.([^.\[\]]+)|\[({_KEY})\]")


def user_path(source: str) -> str:
    """The dotted name, relative to the root module, of what dynamo's ``source`` string reaches ("" for the root
    module itself). A string of another form comes back unchanged."""
    text = source.strip()
    while True:  # innermost call first: getattr(getattr(L['self'], 'a-b'), 'c')
        rewritten = _ATTR_CALL.sub(lambda m: f"{m.group(1)}.{ast.literal_eval(m.group(2))}", text)
        rewritten = _ITEM_CALL.sub(lambda m: f"{m.group(1)}[{m.group(2)}]", rewritten)
        if rewritten == text:
            break
        text = rewritten
    root = _ROOT.match(text)
    if root is not None:
        text = text[root.end() :]
    elif text and text[0] not in ".[":
        text = "." + text  # a dotted name already (an older torch's nn_module_stack)
    steps, end = [], 0
    for step in _STEP.finditer(text):
        if step.start() != end:
            return source
        end = step.end()
        name, key = step.groups()
        steps.append(name if name is not None else str(ast.literal_eval(key)))
    if end != len(text):
        return source
    return ".".join(s for s in steps if s not in _STORAGE)
