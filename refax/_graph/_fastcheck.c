/* The walk cache's witness comparison (refax/_graph/_cache.py), in C.
 *
 * Each function compares what a kept walk read with what is there now and returns True only
 * if every compared object is the very same one (identity: no Python code runs, no __eq__).
 * refax/_graph/_cache.py has a pure-Python version of each with the same semantics, used when
 * this module is not built; tests/test_cache_stateful.py runs against both.
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

/* types_are(xs, types): len(xs) == len(types) and type(xs[i]) is types[i] for every i.
 * xs: a list or tuple. */
static PyObject *types_are(PyObject *self, PyObject *args) {
    PyObject *xs, *types;
    if (!PyArg_ParseTuple(args, "OO", &xs, &types) || !check_tuple(types, "types"))
        return NULL;
    PyObject *seq = PySequence_Fast(xs, "xs must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int same = n == PyTuple_GET_SIZE(types);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; same && i < n; i++)
        same = (PyObject *)Py_TYPE(items[i]) == PyTuple_GET_ITEM(types, i);
    Py_DECREF(seq);
    return PyBool_FromLong(same);
}

/* values_are(objs, expected, n): the values of vars(obj) for every obj in objs, chained in
 * order, are exactly expected[0:n] (n of them, each the very same object). */
static PyObject *values_are(PyObject *self, PyObject *args) {
    PyObject *objs, *expected;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OOn", &objs, &expected, &n) || !check_tuple(objs, "objs") ||
        !check_tuple(expected, "expected"))
        return NULL;
    if (n > PyTuple_GET_SIZE(expected))
        n = PyTuple_GET_SIZE(expected);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(objs); i++) {
        PyObject *d = instance_dict(PyTuple_GET_ITEM(objs, i));
        if (d == NULL)
            return NULL;
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
            Py_RETURN_FALSE;
    }
    return PyBool_FromLong(k == n);
}

/* roots_are(roots, checks): for every (i, cls, keys, p, vals) in checks, roots[i] has type
 * cls, the keys of vars(roots[i]) are exactly keys (same objects, same order), and its values
 * but the one at position p are exactly vals. */
static PyObject *roots_are(PyObject *self, PyObject *args) {
    PyObject *roots, *checks;
    if (!PyArg_ParseTuple(args, "OO", &roots, &checks) || !check_tuple(roots, "roots") ||
        !check_tuple(checks, "checks"))
        return NULL;
    for (Py_ssize_t c = 0; c < PyTuple_GET_SIZE(checks); c++) {
        PyObject *check = PyTuple_GET_ITEM(checks, c);
        if (!PyTuple_Check(check) || PyTuple_GET_SIZE(check) != 5) {
            PyErr_SetString(PyExc_TypeError, "each check must be a 5-tuple");
            return NULL;
        }
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(check, 0));
        Py_ssize_t p = PyLong_AsSsize_t(PyTuple_GET_ITEM(check, 3));
        if (PyErr_Occurred())
            return NULL;
        PyObject *cls = PyTuple_GET_ITEM(check, 1);
        PyObject *keys = PyTuple_GET_ITEM(check, 2);
        PyObject *vals = PyTuple_GET_ITEM(check, 4);
        if (!check_tuple(keys, "keys") || !check_tuple(vals, "vals"))
            return NULL;
        if (i < 0 || i >= PyTuple_GET_SIZE(roots)) {
            PyErr_SetString(PyExc_IndexError, "root index out of range");
            return NULL;
        }
        PyObject *root = PyTuple_GET_ITEM(roots, i);
        if ((PyObject *)Py_TYPE(root) != cls)
            Py_RETURN_FALSE;
        PyObject *d = instance_dict(root);
        if (d == NULL)
            return NULL;
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
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* items_are(dicts, lens, keys, values): every dict has lens[i] items and its keys and values,
 * chained in order over the dicts, are exactly keys and values (same objects). */
static PyObject *items_are(PyObject *self, PyObject *args) {
    PyObject *dicts, *lens, *keys, *values;
    if (!PyArg_ParseTuple(args, "OOOO", &dicts, &lens, &keys, &values) ||
        !check_tuple(dicts, "dicts") || !check_tuple(lens, "lens") ||
        !check_tuple(keys, "keys") || !check_tuple(values, "values"))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(dicts);
    if (PyTuple_GET_SIZE(lens) != n || PyTuple_GET_SIZE(keys) != PyTuple_GET_SIZE(values)) {
        PyErr_SetString(PyExc_ValueError, "mismatched lengths");
        return NULL;
    }
    Py_ssize_t k = 0, total = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyTuple_GET_ITEM(dicts, i);
        if (!PyDict_Check(d)) {
            PyErr_SetString(PyExc_TypeError, "dicts must hold dicts");
            return NULL;
        }
        Py_ssize_t len = PyLong_AsSsize_t(PyTuple_GET_ITEM(lens, i));
        if (len == -1 && PyErr_Occurred())
            return NULL;
        if (PyDict_GET_SIZE(d) != len || k + len > total)
            Py_RETURN_FALSE;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(d, &pos, &key, &value)) {
            if (key != PyTuple_GET_ITEM(keys, k) || value != PyTuple_GET_ITEM(values, k))
                Py_RETURN_FALSE;
            k++;
        }
    }
    return PyBool_FromLong(k == total);
}

/* list_items_are(lists, lens, items): every list has lens[i] items and its items, chained in
 * order over the lists, are exactly items (same objects). */
static PyObject *list_items_are(PyObject *self, PyObject *args) {
    PyObject *lists, *lens, *items;
    if (!PyArg_ParseTuple(args, "OOO", &lists, &lens, &items) || !check_tuple(lists, "lists") ||
        !check_tuple(lens, "lens") || !check_tuple(items, "items"))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(lists);
    if (PyTuple_GET_SIZE(lens) != n) {
        PyErr_SetString(PyExc_ValueError, "mismatched lengths");
        return NULL;
    }
    Py_ssize_t k = 0, total = PyTuple_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *l = PyTuple_GET_ITEM(lists, i);
        if (!PyList_Check(l)) {
            PyErr_SetString(PyExc_TypeError, "lists must hold lists");
            return NULL;
        }
        Py_ssize_t len = PyLong_AsSsize_t(PyTuple_GET_ITEM(lens, i));
        if (len == -1 && PyErr_Occurred())
            return NULL;
        if (PyList_GET_SIZE(l) != len || k + len > total)
            Py_RETURN_FALSE;
        for (Py_ssize_t j = 0; j < len; j++, k++)
            if (PyList_GET_ITEM(l, j) != PyTuple_GET_ITEM(items, k))
                Py_RETURN_FALSE;
    }
    return PyBool_FromLong(k == total);
}

static PyMethodDef methods[] = {
    {"types_are", types_are, METH_VARARGS, "type(xs[i]) is types[i] for every i."},
    {"values_are", values_are, METH_VARARGS, "The objects' __dict__ values are expected[:n]."},
    {"roots_are", roots_are, METH_VARARGS, "The roots' keys and values but one are as recorded."},
    {"items_are", items_are, METH_VARARGS, "The dicts' keys and values are as recorded."},
    {"list_items_are", list_items_are, METH_VARARGS, "The lists' items are as recorded."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcheck",
    "The walk cache's witness comparison in C (see refax/_graph/_cache.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastcheck(void) {
    DICT_NAME = PyUnicode_InternFromString("__dict__");
    if (DICT_NAME == NULL)
        return NULL;
    return PyModule_Create(&module);
}
