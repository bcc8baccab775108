-- hp.merge walks every element of every argument; duplicates never reach its output cap. 20,000 references to a
-- table of 2^16 equal ports would be 1.3e9 C iterations.
return { plan = function(ctx)
    local ones = {}
    for i = 1, 1 << 16 do ones[i] = 1000 end
    local args = {}
    for i = 1, 20000 do args[i] = ones end
    local merged = hp.merge(table.unpack(args))
    return { ports = merged }
end }
