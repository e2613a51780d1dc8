"""The built-in knowledge base: deterministic, unique names, answers present in the biographies."""
import sentencepiece as spm

from tasks import bios


def test_the_generator_is_deterministic_for_a_seed():
    a, b = bios.build(60, seed=3), bios.build(60, seed=3)
    assert a == b
    c = bios.build(60, seed=4)
    assert [p.name for p in a.people] != [p.name for p in c.people]


def test_names_are_unique_and_sets_split_the_people():
    kb = bios.build(2000, seed=0)
    names = [p.name for p in kb.people]
    assert len(set(names)) == 2000
    assert len(kb.set_a) == len(kb.set_b) == 1000
    assert not {p.name for p in kb.set_a} & {p.name for p in kb.set_b}


def test_every_answer_is_in_that_persons_biographies_at_its_span():
    kb = bios.build(100, seed=1, num_renderings=5)
    by_person = {}
    for biography in kb.biographies:
        by_person.setdefault(biography.person, []).append(biography)
    for person in kb.people:
        renderings = by_person[person.name]
        assert len(renderings) == 5
        assert len({r.text for r in renderings}) > 1, "renderings differ"
        for qa in bios.questions(person):
            assert qa.answer == person.attribute(qa.attribute)
            assert person.name in qa.question
            for r in renderings:
                start, limit = r.spans[qa.attribute]
                assert r.text[start:limit] == qa.answer
                assert person.name in r.text


def test_vocabulary_is_trained_once_and_deterministically(tmp_path):
    kb = bios.build(50, seed=0)
    first = bios.train_vocabulary(kb, str(tmp_path / "a.model"), vocab_size=400)
    second = bios.train_vocabulary(kb, str(tmp_path / "b.model"), vocab_size=400)
    assert open(first, "rb").read() == open(second, "rb").read()
    processor = spm.SentencePieceProcessor(model_file=first)
    assert processor.id_to_piece([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    text = kb.biographies[0].text
    assert processor.decode(processor.encode(text)) == text
    mtime = (tmp_path / "a.model").stat().st_mtime_ns
    bios.train_vocabulary(kb, first, vocab_size=400)  # cached: not retrained
    assert (tmp_path / "a.model").stat().st_mtime_ns == mtime


def test_registered_tasks_read_the_knowledge_base(tmp_path, monkeypatch):
    import seqio

    monkeypatch.setenv("T5X_LITE_CACHE_DIR", str(tmp_path))
    bios.register_bios_tasks(num_people=20, seed=5, prefix="bios_test_small")
    kb = bios.build(20, seed=5, num_renderings=bios.DEFAULT_NUM_RENDERINGS)  # what the tasks read
    try:
        qa = seqio.get_mixture_or_task("bios_test_small_cbqa")
        vocabulary = qa.output_features["targets"].vocabulary
        lengths = {"inputs": 64, "targets": 16}
        questions = {
            split: [vocabulary.decode(ex["inputs"].tolist()) for ex in qa.get_dataset(lengths, split=split, shuffle=False).as_numpy_iterator()]
            for split in ("train", "validation")
        }
        assert len(questions["train"]) == len(questions["validation"]) == 60
        assert all(q.startswith("question: ") for q in questions["train"])
        names_in = lambda split: {p.name for p in kb.people if any(p.name in q for q in questions[split])}
        assert names_in("train") == {p.name for p in kb.set_a}
        assert names_in("validation") == {p.name for p in kb.set_b}

        ssm = seqio.get_mixture_or_task("bios_test_small_ssm")
        examples = list(ssm.get_dataset({"inputs": 128, "targets": 64}, split="train", shuffle=False).as_numpy_iterator())
        assert len(examples) == 20 * bios.DEFAULT_NUM_RENDERINGS  # one per biography, every attribute value masked
        first = vocabulary.decode(examples[0]["inputs"].tolist())
        assert first.startswith("nem: ") and first.count("_X_") == len(bios.ATTRIBUTES)
        in_text_order = lambda b: sorted(bios.ATTRIBUTES, key=lambda attribute: b.spans[attribute][0])
        expected_targets = sorted(
            " ".join(f"_X_ {b.text[slice(*b.spans[a])]}" for a in in_text_order(b)) for b in kb.biographies)
        assert sorted(vocabulary.decode(ex["targets"].tolist()) for ex in examples) == expected_targets
        assert (tmp_path / "bios").is_dir(), "the vocabulary is trained into the cache folder"
    finally:
        for name in ("cbqa", "ssm", "span_corruption"):
            seqio.TaskRegistry.remove(f"bios_test_small_{name}")
        for mixture in ("pretrain_ssm_qa", "pretrain_span_corruption_qa"):
            seqio.MixtureRegistry.remove(f"bios_test_small_{mixture}")
