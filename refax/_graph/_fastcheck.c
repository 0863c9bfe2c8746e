/* The walk cache's witness comparison (refax/_graph/_cache.py), in C.
 *
 * Each function compares what a kept walk read with what is there now and returns True only
 * if every compared object is the very same one (identity: no Python code runs, no __eq__).
 * refax/_graph/_cache.py has a pure-Python version of each (_PyCheck), used when this module
 * is not built; it compares dict keys by equality where these compare them by identity, so
 * this module never accepts what the Python version refuses. tests/test_cache_stateful.py runs
 * against both, tests/test_fastcheck.py compares them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *DICT_NAME; /* "__dict__" */

/* vars(obj): a new reference to a dict, or NULL with an exception set. */
static PyObject *instance_dict(PyObject *obj) {
    PyObject *d = PyObject_GetAttr(obj, DICT_NAME);
    if (d == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_SetString(PyExc_TypeError, "vars() argument must have __dict__ attribute");
        return NULL;
    }
    if (d != NULL && !PyDict_Check(d)) {
        Py_DECREF(d);
        PyErr_SetString(PyExc_TypeError, "vars() argument must have a dict __dict__");
        return NULL;
    }
    return d;
}

static int check_tuple(PyObject *x, const char *what) {
    if (!PyTuple_Check(x)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple", what);
        return 0;
    }
    return 1;
}

/* type(xs[i]) is types[i] for every i, as many of each: 1, 0, or -1 with an exception.
 * xs: a list or tuple. */
static int types_ok(PyObject *xs, PyObject *types) {
    if (!check_tuple(types, "types"))
        return -1;
    PyObject *seq = PySequence_Fast(xs, "xs must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int same = n == PyTuple_GET_SIZE(types);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; same && i < n; i++)
        same = (PyObject *)Py_TYPE(items[i]) == PyTuple_GET_ITEM(types, i);
    Py_DECREF(seq);
    return same;
}

/* The values of vars(obj) for every obj in objs, chained in order, are exactly
 * expected[0:n] (n of them, each the very same object). */
static int values_ok(PyObject *objs, PyObject *expected, Py_ssize_t n) {
    if (!check_tuple(objs, "objs") || !check_tuple(expected, "expected"))
        return -1;
    if (n > PyTuple_GET_SIZE(expected))
        n = PyTuple_GET_SIZE(expected);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(objs); i++) {
        PyObject *d = instance_dict(PyTuple_GET_ITEM(objs, i));
        if (d == NULL)
            return -1;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        int same = 1;
        while (PyDict_Next(d, &pos, &key, &value)) {
            if (k >= n || value != PyTuple_GET_ITEM(expected, k)) {
                same = 0;
                break;
            }
            k++;
        }
        Py_DECREF(d);
        if (!same)
            return 0;
    }
    return k == n;
}

/* For every (i, cls, keys, p, vals) in checks, roots[i] has type cls, the keys of
 * vars(roots[i]) are exactly keys (same objects, same order), and its values but the one at
 * position p are exactly vals. */
static int roots_ok(PyObject *roots, PyObject *checks) {
    if (!check_tuple(roots, "roots") || !check_tuple(checks, "checks"))
        return -1;
    for (Py_ssize_t c = 0; c < PyTuple_GET_SIZE(checks); c++) {
        PyObject *check = PyTuple_GET_ITEM(checks, c);
        if (!PyTuple_Check(check) || PyTuple_GET_SIZE(check) != 5) {
            PyErr_SetString(PyExc_TypeError, "each check must be a 5-tuple");
            return -1;
        }
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(check, 0));
        Py_ssize_t p = PyLong_AsSsize_t(PyTuple_GET_ITEM(check, 3));
        if (PyErr_Occurred())
            return -1;
        PyObject *cls = PyTuple_GET_ITEM(check, 1);
        PyObject *keys = PyTuple_GET_ITEM(check, 2);
        PyObject *vals = PyTuple_GET_ITEM(check, 4);
        if (!check_tuple(keys, "keys") || !check_tuple(vals, "vals"))
            return -1;
        if (i < 0 || i >= PyTuple_GET_SIZE(roots)) {
            PyErr_SetString(PyExc_IndexError, "root index out of range");
            return -1;
        }
        PyObject *root = PyTuple_GET_ITEM(roots, i);
        if ((PyObject *)Py_TYPE(root) != cls)
            return 0;
        PyObject *d = instance_dict(root);
        if (d == NULL)
            return -1;
        int same = PyDict_GET_SIZE(d) == PyTuple_GET_SIZE(keys) &&
                   PyTuple_GET_SIZE(vals) == PyTuple_GET_SIZE(keys) - 1;
        Py_ssize_t pos = 0, k = 0, v = 0;
        PyObject *key, *value;
        while (same && PyDict_Next(d, &pos, &key, &value)) {
            if (k >= PyTuple_GET_SIZE(keys) || key != PyTuple_GET_ITEM(keys, k)) {
                same = 0;
            } else if (k != p) {
                same = v < PyTuple_GET_SIZE(vals) && value == PyTuple_GET_ITEM(vals, v);
                v++;
            }
            k++;
        }
        Py_DECREF(d);
        if (!same)
            return 0;
    }
    return 1;
}

/* Every dict has lens[i] items and its keys and values, chained in order over the dicts, are
 * exactly keys and values (same objects). */
static int items_ok(PyObject *dicts, PyObject *lens, PyObject *keys, PyObject *values) {
    if (!check_tuple(dicts, "dicts") || !check_tuple(lens, "lens") ||
        !check_tuple(keys, "keys") || !check_tuple(values, "values"))
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(dicts);
    if (PyTuple_GET_SIZE(lens) != n || PyTuple_GET_SIZE(keys) != PyTuple_GET_SIZE(values)) {
        PyErr_SetString(PyExc_ValueError, "mismatched lengths");
        return -1;
    }
    Py_ssize_t k = 0, total = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyTuple_GET_ITEM(dicts, i);
        if (!PyDict_Check(d)) {
            PyErr_SetString(PyExc_TypeError, "dicts must hold dicts");
            return -1;
        }
        Py_ssize_t len = PyLong_AsSsize_t(PyTuple_GET_ITEM(lens, i));
        if (len == -1 && PyErr_Occurred())
            return -1;
        if (PyDict_GET_SIZE(d) != len || k + len > total)
            return 0;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(d, &pos, &key, &value)) {
            if (key != PyTuple_GET_ITEM(keys, k) || value != PyTuple_GET_ITEM(values, k))
                return 0;
            k++;
        }
    }
    return k == total;
}

/* Every list has lens[i] items and its items, chained in order over the lists, are exactly
 * items (same objects). */
static int list_items_ok(PyObject *lists, PyObject *lens, PyObject *items) {
    if (!check_tuple(lists, "lists") || !check_tuple(lens, "lens") || !check_tuple(items, "items"))
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(lists);
    if (PyTuple_GET_SIZE(lens) != n) {
        PyErr_SetString(PyExc_ValueError, "mismatched lengths");
        return -1;
    }
    Py_ssize_t k = 0, total = PyTuple_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *l = PyTuple_GET_ITEM(lists, i);
        if (!PyList_Check(l)) {
            PyErr_SetString(PyExc_TypeError, "lists must hold lists");
            return -1;
        }
        Py_ssize_t len = PyLong_AsSsize_t(PyTuple_GET_ITEM(lens, i));
        if (len == -1 && PyErr_Occurred())
            return -1;
        if (PyList_GET_SIZE(l) != len || k + len > total)
            return 0;
        for (Py_ssize_t j = 0; j < len; j++, k++)
            if (PyList_GET_ITEM(l, j) != PyTuple_GET_ITEM(items, k))
                return 0;
    }
    return k == total;
}

/* -- the module's functions ---------------------------------------------------------- */
static PyObject *as_bool(int r) {
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

/* types_are(xs, types) */
static PyObject *types_are(PyObject *self, PyObject *args) {
    PyObject *xs, *types;
    if (!PyArg_ParseTuple(args, "OO", &xs, &types))
        return NULL;
    return as_bool(types_ok(xs, types));
}

/* values_are(objs, expected, n) */
static PyObject *values_are(PyObject *self, PyObject *args) {
    PyObject *objs, *expected;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OOn", &objs, &expected, &n))
        return NULL;
    return as_bool(values_ok(objs, expected, n));
}

/* roots_are(roots, checks) */
static PyObject *roots_are(PyObject *self, PyObject *args) {
    PyObject *roots, *checks;
    if (!PyArg_ParseTuple(args, "OO", &roots, &checks))
        return NULL;
    return as_bool(roots_ok(roots, checks));
}

/* items_are(dicts, lens, keys, values) */
static PyObject *items_are(PyObject *self, PyObject *args) {
    PyObject *dicts, *lens, *keys, *values;
    if (!PyArg_ParseTuple(args, "OOOO", &dicts, &lens, &keys, &values))
        return NULL;
    return as_bool(items_ok(dicts, lens, keys, values));
}

/* list_items_are(lists, lens, items) */
static PyObject *list_items_are(PyObject *self, PyObject *args) {
    PyObject *lists, *lens, *items;
    if (!PyArg_ParseTuple(args, "OOO", &lists, &lens, &items))
        return NULL;
    return as_bool(list_items_ok(lists, lens, items));
}

/* witness_is(roots, root_checks, objs, types, vals, n, leaves, leaf_types, lists, list_lens,
 * list_items, dicts, dict_lens, dict_keys, dict_values): all of the above in one call, as
 * Entry.valid makes them (empty objs, lists or dicts are skipped). */
static PyObject *witness_is(PyObject *self, PyObject *args) {
    PyObject *roots, *checks, *objs, *types, *vals, *leaves, *leaf_types;
    PyObject *lists, *list_lens, *list_items, *dicts, *dict_lens, *dict_keys, *dict_values;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OOOOOnOOOOOOOOO", &roots, &checks, &objs, &types, &vals, &n,
                          &leaves, &leaf_types, &lists, &list_lens, &list_items, &dicts,
                          &dict_lens, &dict_keys, &dict_values))
        return NULL;
    int r = roots_ok(roots, checks);
    if (r == 1 && PyTuple_Check(objs) && PyTuple_GET_SIZE(objs) > 0) {
        r = types_ok(objs, types);
        if (r == 1)
            r = values_ok(objs, vals, n);
    }
    if (r == 1)
        r = types_ok(leaves, leaf_types);
    if (r == 1 && PyTuple_Check(lists) && PyTuple_GET_SIZE(lists) > 0)
        r = list_items_ok(lists, list_lens, list_items);
    if (r == 1 && PyTuple_Check(dicts) && PyTuple_GET_SIZE(dicts) > 0)
        r = items_ok(dicts, dict_lens, dict_keys, dict_values);
    return as_bool(r);
}

static PyMethodDef methods[] = {
    {"types_are", types_are, METH_VARARGS, "type(xs[i]) is types[i] for every i."},
    {"values_are", values_are, METH_VARARGS, "The objects' __dict__ values are expected[:n]."},
    {"roots_are", roots_are, METH_VARARGS, "The roots' keys and values but one are as recorded."},
    {"items_are", items_are, METH_VARARGS, "The dicts' keys and values are as recorded."},
    {"list_items_are", list_items_are, METH_VARARGS, "The lists' items are as recorded."},
    {"witness_is", witness_is, METH_VARARGS, "All of the above, as Entry.valid makes them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcheck",
    "The walk cache's witness comparison in C (see refax/_graph/_cache.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastcheck(void) {
    DICT_NAME = PyUnicode_InternFromString("__dict__");
    if (DICT_NAME == NULL)
        return NULL;
    return PyModule_Create(&module);
}
