"""Video benchmark evaluation that reproduces papers: the benchmarks' own files, their official scores.

readers.py  one reader per benchmark's released schema (VSI-Bench and its debiased split, MMVU, Video-MMMU,
            Video-MME, MVBench, TempCompass, Video-Holmes, Video-R1's evaluation JSON)
scorers.py  answer reading, each benchmark's per-question score and headline, VSI-Bench's three conventions
prompts.py  the prompt templates, clip bounds and subtitles, the Dataset the library's collator batches
runner.py   `veripo evaluate`: policy + benchmark -> answers.jsonl (resumable), tables, results.json
"""
