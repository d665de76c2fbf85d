"""Split notebook cells that mix top-level imports with other code into an import cell and the rest.

nbdev's documentation processor runs every cell that imports something, at any depth (so `show_doc` can see the
names), and warns about cells that also do other work at the top level, which it would then run too: `python
docs_site/split_imports.py nbs/*.ipynb`. Top-level imports move to a new cell just before; so do one-line imports
nested in a block (an `if`, a `with`, a function), which then run unconditionally: check such a cell by eye.
"""
import ast
import json
import sys
import uuid


def split(path) -> int:
    nb, n = json.load(open(path)), 0
    cells = []
    for c in nb['cells']:
        src = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
        lines = src.splitlines()
        k = 0
        while k < len(lines) and lines[k].startswith('#|'):
            k += 1
        if any('export' in ln for ln in lines[:k]):  # nbdev runs exported cells anyway
            cells.append(c)
            continue
        try:
            tree = ast.parse(src) if c['cell_type'] == 'code' and not src.lstrip().startswith(('%', '!')) else None
        except SyntaxError:
            tree = None
        imports = [t for t in (ast.walk(tree) if tree else []) if isinstance(t, (ast.Import, ast.ImportFrom))]
        top = [t for t in imports if t in tree.body] if tree else []
        nested = [t for t in imports if t not in top and t.lineno == t.end_lineno]
        if not imports or (not nested and not any(isinstance(t, (ast.Expr, ast.Assign)) for t in tree.body)):
            cells.append(c)
            continue
        take = {i for t in top + nested for i in range(t.lineno - 1, t.end_lineno)}
        head = [lines[i].strip() if i in {t.lineno - 1 for t in nested} else lines[i] for i in sorted(take)]
        rest = '\n'.join(ln for i, ln in enumerate(lines) if i not in take).strip('\n')
        cells.append(dict(cell_type='code', execution_count=None, id=uuid.uuid4().hex[:8], metadata={}, outputs=[],
                          source='\n'.join(head)))
        c['source'] = rest
        cells.append(c)
        n += 1
    if n:
        nb['cells'] = cells
        with open(path, 'w') as f:
            json.dump(nb, f, indent=1, ensure_ascii=False)
            f.write('\n')
    return n


if __name__ == '__main__':
    for p in sys.argv[1:]:
        k = split(p)
        if k:
            print(f'{p}: {k} cell(s) split')
