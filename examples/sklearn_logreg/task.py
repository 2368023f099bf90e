"""The data and the model: scikit-learn's digits, split non-IID, and a logistic regression."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split

CLASSES = np.arange(10)
SEED = 0


def _split():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x / 16.0, y, test_size=0.25, random_state=SEED, stratify=y)


def load_partition(partition_id: int, num_partitions: int):
    """This node's part of the training set. Non-IID: for each digit, the share each node
    gets is drawn from a Dirichlet(0.5) distribution, so nodes see different digits."""
    x_train, _, y_train, _ = _split()
    rng = np.random.default_rng(SEED)
    mine = []
    for digit in CLASSES:
        index = rng.permutation(np.flatnonzero(y_train == digit))
        shares = rng.dirichlet(np.full(num_partitions, 0.5))
        bounds = (np.cumsum(shares) * len(index)).astype(int)[:-1]
        mine.append(np.split(index, bounds)[partition_id])
    index = np.concatenate(mine)
    return x_train[index], y_train[index]


def load_test_set():
    """The held-out test set, on the server."""
    _, x_test, _, y_test = _split()
    return x_test, y_test


def new_model() -> SGDClassifier:
    """A multinomial logistic regression trained by SGD, with all-zero weights."""
    model = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.05, alpha=1e-4)
    set_weights(model, [np.zeros((len(CLASSES), 64)), np.zeros(len(CLASSES))])
    return model


def get_weights(model: SGDClassifier):
    return [model.coef_, model.intercept_]


def set_weights(model: SGDClassifier, weights) -> None:
    model.coef_, model.intercept_ = np.array(weights[0]), np.array(weights[1])
    model.classes_ = CLASSES


def train(model: SGDClassifier, x, y, epochs: int) -> None:
    for _ in range(epochs):
        model.partial_fit(x, y, classes=CLASSES)


def test(model: SGDClassifier, x, y):
    """Loss and accuracy of the model on (x, y)."""
    loss = log_loss(y, model.predict_proba(x), labels=CLASSES)
    return float(loss), float(model.score(x, y))
